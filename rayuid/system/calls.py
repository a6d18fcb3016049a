"""The one place that calls a role: with the run's timeout, retried on an actor Ray has restarted.

Engines and the user simulator are restarted by Ray (``ray.max_restarts``): a restarted engine comes back at
version 0, the WeightSyncActor loads the current version into it, and the same call is retried on it; a simulator
holds no state, so its call is simply retried. Calls are deterministic in their inputs (ids, seeds), so a retried
call trains nothing twice. Learner calls are not retried here: a dead learner breaks a step that has to be redone
from the last checkpoint, which the driver does (``rayuid.system.driver.train_with_recovery``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)
ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# What the driver recovers from by replacing the learners: a learner's death, met directly or through the weights it
# owned (rank 0 puts each publish buffer: if its node dies before every engine loaded it, they meet OwnerDiedError)
LEARNER_LOST = (*ACTOR_DIED, ray.exceptions.ObjectLostError)


@dataclass(frozen=True)
class Calls:
    """How the driver reaches the actors of ``system`` (a ``rayuid.system.actors.spawn.System``)."""

    system: object
    timeout_s: float
    retries: int

    def wait(self, refs):
        """``ray.get`` with the run's timeout (a late actor is an error, never a hang)."""
        return ray.get(refs, timeout=self.timeout_s)

    def sync(self, method: str, *args):
        """A call on the WeightSyncActor (publish, resume_at, ...); its own waits name a late engine."""
        return self.wait(getattr(self.system.sync, method).remote(*args))

    def learners(self, method: str, per_rank: list[tuple]) -> list:
        """``method(*per_rank[i])`` on learner i, all submitted before any is awaited; one result per learner."""
        return self.wait([getattr(l, method).remote(*args) for l, args in zip(self.system.learners, per_rank)])

    def engine(self, name: str, method: str, *args):
        """``engines[name].method(*args)``, retried on a restarted engine after it is brought to the current version."""
        return self._engine(name, method, args, self.retries)

    def engines(self, names: list[str], method: str, shards: list[tuple]) -> list:
        """Submit every shard to its engine, then collect; a shard whose engine died is retried alone."""
        refs = [getattr(self.system.engines[n], method).remote(*args) for n, args in zip(names, shards)]
        return [self._collect(name, method, args, ref) for name, args, ref in zip(names, shards, refs)]

    def _engine(self, name: str, method: str, args: tuple, retries: int):
        return self._collect(name, method, args, getattr(self.system.engines[name], method).remote(*args), retries)

    def _collect(self, name: str, method: str, args: tuple, ref, retries: int | None = None):
        """The result of ``ref``; if its engine died: recover the engine, then call again (``retries`` more times)."""
        retries = self.retries if retries is None else retries
        try:
            return self.wait(ref)
        except ACTOR_DIED as err:
            if retries == 0:
                raise
            log.warning("engine %s died during %s (%s); retrying on its restarted actor", name, method,
                        type(err).__name__)
            self.recover_engine(name)
            return self._engine(name, method, args, retries - 1)

    def recover_engine(self, name: str) -> None:
        """The WeightSyncActor waits until Ray has restarted engine ``name``, then loads the current weights into it."""
        self.wait(self.system.sync.sync_engine.remote(name))

    def user(self, method: str, calls: list[tuple]) -> list:
        """``method(*args)`` for every ``args``, call i on user simulator replica i mod ``len(system.users)`` (all
        submitted at once); a call that meets a dead replica is retried on that replica's restarted actor."""
        users = self.system.users
        handles = [users[i % len(users)] for i in range(len(calls))]
        refs = [getattr(h, method).remote(*args) for h, args in zip(handles, calls)]
        return [self._user_result(h, method, args, ref) for h, args, ref in zip(handles, calls, refs)]

    def _user_result(self, user, method: str, args: tuple, ref):
        """A simulator holds no state, so a call is simply sent again: after a death (``retries`` of them at most),
        and while Ray is still restarting the actor (not a new death, so no retry is spent; bounded by the timeout)."""
        deaths, deadline = 0, time.monotonic() + self.timeout_s
        while True:
            try:
                return self.wait(ref)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.RayActorError:
                if deaths == self.retries:
                    raise
                deaths += 1
                log.warning("user simulator died during %s; retrying on its restarted actor", method)
            ref = getattr(user, method).remote(*args)
