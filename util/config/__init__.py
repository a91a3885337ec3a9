"""Experiment configuration: YAML lists of experiments, validation and command-line overrides.

A config file is a YAML list; each entry is one experiment::

    - name: drrnet_demo            # optional: run name (default: <file stem>_<config_id>)
      model:     {type: drrnet, ...}      # keyword arguments of the registered model
      dataset:   {type: demo, ...}        # keyword arguments of the registered dataset
      optim:     {type: adam, lr: 1e-4}   # optional (defaults below)
      scheduler: {type: cosine}           # optional
      train:     {epochs: 50}             # optional, keys of TrainConfig
      test:      {chunk_size: 262144}     # optional, keys of the task's test_config (ensemble: EnsembleTestConfig)

YAML anchors (``&base`` / ``*base``) and merge keys (``<<: *base``) work, so experiments can share sections.
``--config FILE --config_id N`` selects entry N (0-based); ``--set section.key=value`` (repeatable) overrides a
key, the value parsed as YAML (``--set train.max_steps=10 --set dataset.tau_x=[0.01,0.01,0.01]``);
``--set 'dataset={type: ensemble, data_dir: ...}'`` replaces a whole section.
Every key is checked when the config is loaded: unknown section, unknown or missing key, unknown type; the
error names the file, the config id, the section and the key.

Modules:
    reader      the one YAML reader (config files, ``--set`` and test.py ``--test`` values, run files).
    schema      value checks: type annotations, range rules, the field checks of dataclass sections.
    experiment  ``TrainConfig``, validation of a whole experiment, :func:`load_config`, run names.
"""
from util.config.experiment import (COMPONENT_SECTIONS, DATACLASS_SECTIONS, DEFAULT_SECTIONS, INJECTED, OTHER_KEYS,
                                    TrainConfig, injected_keys, load_config, merge_test_config, run_name,
                                    section_kwargs, test_config_class, validate_experiment)
from util.config.reader import (DuplicateKeyError, apply_overrides, parse_test_overrides, parse_value,
                                read_config_file, yaml_load)
from util.config.schema import (EMPTY_LIST_OK, NON_NEGATIVE, POSITIVE, RANGE_RULES, VERTICES, check_dataclass_fields,
                                above, at_least, check_component_values, check_run_name, check_value,
                                component_types, describe_type, in_range, low_high, one_of, show_value)
from util.registry import ConfigError

__all__ = ["TrainConfig", "load_config", "apply_overrides", "validate_experiment", "ConfigError",
           "COMPONENT_SECTIONS", "INJECTED", "DEFAULT_SECTIONS", "DATACLASS_SECTIONS", "OTHER_KEYS", "yaml_load",
           "DuplicateKeyError", "parse_value", "parse_test_overrides", "read_config_file", "run_name",
           "section_kwargs", "merge_test_config", "injected_keys", "test_config_class", "check_value",
           "check_run_name", "check_component_values", "component_types", "describe_type", "show_value",
           "RANGE_RULES", "EMPTY_LIST_OK", "at_least", "above", "in_range", "one_of", "low_high", "POSITIVE",
           "NON_NEGATIVE", "VERTICES", "check_dataclass_fields"]
