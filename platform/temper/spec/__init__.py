"""Job spec: models, YAML loading, overrides. Imports neither torch nor ray."""

from temper.spec.job import (
    CausalLMSpec,
    ClassifySpec,
    DDPSpec,
    DeepSpeedSpec,
    EncoderSpec,
    FSDPSpec,
    GPTSpec,
    JobSpec,
    MAESpec,
    MLMSpec,
    OptimSpec,
    RecurrentSpec,
    ResNetSpec,
    ResourcesSpec,
    ScheduleSpec,
    SimCLRSpec,
    SyntheticDataSpec,
    TrackingSpec,
    TrainSpec,
    ViTSpec,
)
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

__all__ = [
    "CausalLMSpec", "ClassifySpec", "DDPSpec", "DeepSpeedSpec", "EncoderSpec", "FSDPSpec", "GPTSpec", "JobSpec",
    "MAESpec", "MLMSpec", "OptimSpec", "RecurrentSpec", "ResNetSpec", "ResourcesSpec", "ScheduleSpec",
    "SimCLRSpec", "SyntheticDataSpec", "TrackingSpec", "TrainSpec", "ViTSpec",
    "apply_overrides", "flatten", "load_spec", "spec_from_json", "spec_hash", "spec_to_dict",
    "spec_to_json", "spec_to_yaml", "validate_spec",
]
