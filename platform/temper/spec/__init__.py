"""Job spec: models, YAML loading, overrides. Imports neither torch nor ray."""

from temper.spec.loader import (
    apply_overrides,
    flatten,
    load_spec,
    spec_from_json,
    spec_hash,
    spec_to_dict,
    spec_to_json,
    spec_to_yaml,
    validate_spec,
)
from temper.spec.models import (
    CausalLMSpec,
    ClassifySpec,
    DDPSpec,
    DeepSpeedSpec,
    FSDPSpec,
    GPTSpec,
    JobSpec,
    OptimSpec,
    ResNetSpec,
    ResourcesSpec,
    ScheduleSpec,
    SyntheticDataSpec,
    TrackingSpec,
    TrainSpec,
)

__all__ = [
    "CausalLMSpec", "ClassifySpec", "DDPSpec", "DeepSpeedSpec", "FSDPSpec", "GPTSpec", "JobSpec", "OptimSpec", "ResNetSpec",
    "ResourcesSpec", "ScheduleSpec", "SyntheticDataSpec", "TrackingSpec", "TrainSpec",
    "apply_overrides", "flatten", "load_spec", "spec_from_json", "spec_hash", "spec_to_dict",
    "spec_to_json", "spec_to_yaml", "validate_spec",
]
