"""What TensorBoard shows of a run beyond its scalars: the Custom Scalars layout (loss first, then the sample
metrics, whose step 0 is the base model) and the HParams row with values of their own types. Written by
:class:`meowdread.callbacks.SampleCallback`; see README "TensorBoard"."""

from __future__ import annotations

import re
from typing import Any

from lightning.fabric.utilities.logger import _flatten_dict, _sanitize_params
from lightning.pytorch.loggers import TensorBoardLogger


def scalars_layout(lexicons: list[str]) -> dict[str, dict[str, list]]:
    """The Custom Scalars layout: ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``, in order."""

    def chart(*tags: str) -> list:
        return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]

    voice = {}
    for name in lexicons:
        voice[f"{name}: share of answers with a marker"] = chart(f"samples/{name}_share")
        voice[f"{name}: markers per 100 words"] = chart(f"samples/{name}_per_100_words")
    voice["coherence_ppl: perplexity under the base model (lower is better)"] = chart("samples/coherence_ppl")
    voice["distinct_1, distinct_2: unique words and word pairs"] = chart("samples/distinct_1", "samples/distinct_2")
    voice["memorized_share: answers copying 8+ words of a training reply"] = chart("samples/memorized_share")
    return {
        "loss": {"train/loss and val/loss": chart("train/loss", "val/loss"), "val/ppl": chart("val/ppl")},
        "voice: step 0 is the base model, then one point per epoch": voice,
        "speed": {
            "trained tokens/s": chart("perf/trained_tokens_per_s"),
            "trained tokens per optimizer step": chart("train/trained_tokens"),
            "peak GPU memory (GB)": chart("perf/peak_mem_gb"),
            "seconds spent sampling": chart("samples/seconds"),
        },
    }


def log_hparams(logger: TensorBoardLogger, params: dict[str, Any], metrics: list[str], step: int) -> None:
    """The run's row in the HParams tab: ``params`` (flattened as Lightning's ``log_hyperparams`` does, to
    ``lora/r``), and as its metrics the last value of the scalar ``metrics`` (``val/loss``, ...).

    Unlike ``logger.log_hyperparams(params, metrics)``, no one-point ``hp/*`` copies of the metrics are written,
    which would open TensorBoard's scalar dashboards, and the values keep their types: torch's ``hparams``
    summary tests ``int`` before ``bool``, so True would be the number 1, and the HParams tab prints every
    number with 5 digits (16 as "16.000"), so integers are written as text, and booleans as booleans."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    logger.hparams.update(params)  # hparams.yaml, as log_hyperparams keeps it
    flat = _sanitize_params(_flatten_dict(params))
    booleans = {k for k, v in flat.items() if isinstance(v, bool)}
    flat = {k: str(v) if isinstance(v, int) and k not in booleans else v for k, v in flat.items()}
    summaries = hparams(flat, dict.fromkeys(metrics, 0.0))  # only the metrics' names are written
    for summary in summaries[:2]:  # the experiment (each hparam's type), the session start (each value)
        value = summary.value[0]
        data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            if info.name in booleans:
                info.type = api_pb2.DATA_TYPE_BOOL
        for name in booleans & set(data.session_start_info.hparams):
            data.session_start_info.hparams[name].bool_value = flat[name]
        value.metadata.plugin_data.content = data.SerializeToString()
    writer = logger.experiment._get_file_writer()
    for summary in summaries:
        writer.add_summary(summary, step)
