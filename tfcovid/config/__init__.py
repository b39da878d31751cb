"""Configuration: what an experiment is (``schema``: frozen dataclasses and the fixed choices),
how it is read (``loading``: YAML files, ``--set`` assignments, command-line flags, the demo
preset) and what makes it valid (``checks``). Config is data: YAML -> typed dataclasses ->
function arguments, saved as ``config.yaml`` in every run.

May import: the standard library and PyYAML only (no TensorFlow, no other tfcovid package).
This package's names are re-exported here: ``from tfcovid import config; config.resolve(...)``.
"""
from tfcovid.config.checks import (  # noqa: F401
    resample_processes,
    validate,
)
from tfcovid.config.loading import (  # noqa: F401
    configs_folder,
    find_config,
    from_dict,
    installed_configs,
    load_yaml,
    local_demo_folder,
    merge,
    overrides_from_flags,
    parse_assignments,
    resolve,
)
from tfcovid.config.schema import (  # noqa: F401
    BACKBONES,
    CONV_LAYERS,
    DEMO_MULTILABEL,
    DEMO_PRESET,
    LOSSES,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    NULLABLE,
    OPTIMIZERS,
    PRECISIONS,
    PREPROCESSING,
    SECTIONS,
    STAGES,
    STRATEGIES,
    STUDY_LABEL_MAP,
    STUDY_LABELS,
    TASKS,
    TOP_LEVEL,
    AugmentConfig,
    ConfigError,
    DataConfig,
    Experiment,
    ModelConfig,
    TrainConfig,
    describe_demo_preset,
)
