"""Faults the tuning tests inject, in a module the tuner's worker processes get by value
(``cloudpickle.register_pickle_by_value``): tests/ is not importable there."""

import dataclasses
import time


def hang(rt_mod, device, evaluator_config, repeated_args):
    """A runner's evaluator whose kernel never finishes: sleeps past any runner timeout."""
    time.sleep(3600)


def broken_space(space, tile):
    """``space``, whose design space of ``tile`` raises."""

    class Broken(type(space)):
        def sch_fn(self, t):
            if tuple(t) != tuple(tile):
                return super().sch_fn(t)

            def broken(sch):
                raise RuntimeError(f"injected design-space failure for tile {t[0]}x{t[1]} (test)")

            return broken

    return Broken(**{f.name: getattr(space, f.name) for f in dataclasses.fields(space)})
