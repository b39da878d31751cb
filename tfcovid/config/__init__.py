"""Configuration: what an experiment is (``schema``: frozen dataclasses and the fixed choices),
how it is read (``loading``: YAML files, ``--set`` assignments, command-line flags, the demo
preset) and what makes it valid (``checks``). Config is data: YAML -> typed dataclasses ->
function arguments, saved as ``config.yaml`` in every run.

May import: the standard library and PyYAML only (no TensorFlow, no other tfcovid package).
This package's names are re-exported here: ``from tfcovid import config; config.resolve(...)``.
"""
from tfcovid.config.schema import (  # noqa: F401
    TASKS,
    BACKBONES,
    LOSSES,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    PREPROCESSING,
    MIN_IMAGE_SIZE,
    CONV_LAYERS,
    MAX_SEED,
    STUDY_LABELS,
    STUDY_LABEL_MAP,
    ConfigError,
    DataConfig,
    AugmentConfig,
    ModelConfig,
    TrainConfig,
    Experiment,
    NULLABLE,
    SECTIONS,
    TOP_LEVEL,
    DEMO_PRESET,
    DEMO_MULTILABEL,
    describe_demo_preset,
)
from tfcovid.config.loading import (  # noqa: F401
    merge,
    load_yaml,
    overrides_from_flags,
    parse_assignments,
    local_demo_folder,
    configs_folder,
    installed_configs,
    find_config,
    resolve,
    from_dict,
)
from tfcovid.config.checks import (  # noqa: F401
    validate,
    resample_processes,
)
