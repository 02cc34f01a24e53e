"""Configuration: a leaf package (it imports nothing else of backdoors but errors and
typecheck). Native YAML sections, Backdoors 101 flat files, YAML 1.2 numbers."""

from backdoors.config.compat import convert_legacy, is_legacy
from backdoors.config.federated import FederatedConfig
from backdoors.config.native import (
    Config,
    apply_overrides,
    check_run_name,
    from_dict,
    load_config,
    native_data,
    parse_override,
    read_yaml,
    set_dotted,
)
from backdoors.config.sections import Component, parse_component, parse_section
from backdoors.config.train import TrainConfig
from backdoors.config.yaml12 import load_yaml

__all__ = [
    "Component", "Config", "FederatedConfig", "TrainConfig", "apply_overrides",
    "check_run_name", "convert_legacy", "from_dict", "is_legacy", "load_config", "load_yaml",
    "native_data", "parse_component", "parse_override", "parse_section", "read_yaml",
    "set_dotted",
]
