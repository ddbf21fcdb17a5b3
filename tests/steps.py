"""The real step over the real Learners, built the way mokd-train builds them, for tests that drive
it directly."""
from __future__ import annotations

import torch


def learners_and_step(config, device=torch.device("cpu"), world_size: int = 1, seed: int = 0):
    from mokd_scale.engine.learner import Learner
    from mokd_scale.method.objective import Objective
    from mokd_scale.models import pair_search_dim
    from mokd_scale.train.schedules import Schedules
    from mokd_scale.train.step import Step

    torch.manual_seed(seed)
    search_dim = pair_search_dim(config)
    learners = {name: Learner(name, config, search_dim, device, world_size) for name in config.networks}
    return learners, Step(learners, Objective(config), Schedules.build(config), config)
