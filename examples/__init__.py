"""Extensions of the training loop, each one short file and one config, run through the stock CLI.

From the repository root (so that ``examples`` imports)::

    meowdread fit --config configs/tiny.yaml --config examples/neftune.yaml
    meowdread fit --config configs/tiny.yaml --config examples/kl_to_base.yaml
    meowdread fit --config configs/tiny.yaml --config examples/dora.yaml
    meowdread fit --config configs/tiny.yaml --config examples/prompt_completion.yaml
    meowdread fit --config configs/tiny.yaml --config examples/extra_metric.yaml

``tests/test_examples.py`` runs each and checks its effect.
"""
