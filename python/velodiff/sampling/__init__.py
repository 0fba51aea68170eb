"""The sampling layer: schedules, and samplers as small pure functions over a precomputed schedule."""
from velodiff.sampling.plan import Call, SamplerPlan, run_plan
from velodiff.sampling.samplers import SAMPLERS, build_plan, max_num_steps
from velodiff.sampling.schedules import MAX_NUM_STEPS, NoiseSchedule

__all__ = ["Call", "SamplerPlan", "run_plan", "SAMPLERS", "build_plan", "max_num_steps", "MAX_NUM_STEPS",
           "NoiseSchedule"]
