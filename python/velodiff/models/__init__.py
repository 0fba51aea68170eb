"""velodiff model graphs: our own modules with diffusers' parameter names, so diffusers checkpoints load with a
plain ``load_state_dict`` and diffusers is the parity oracle. :mod:`velodiff.models.registry` maps a diffusers
class name to the class here (importing this package imports no model code)."""
from velodiff.models.registry import (MODEL_CLASSES, TEXT_ENCODER_CLASSES, diffusers_class_name, model_class_for,
                                      text_encoder_class_for)

__all__ = ["MODEL_CLASSES", "TEXT_ENCODER_CLASSES", "diffusers_class_name", "model_class_for",
           "text_encoder_class_for"]
