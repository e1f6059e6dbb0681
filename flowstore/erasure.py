"""Erasing a user by crypto-shredding: end each of their runs with `FlowErased`, then drop the key.

The log stays append-only. Every event of the user is sealed with their own key (`flowstore.keys`);
once it is gone, the events read with a stand-in user id and no payload, in the log and in any copy
made from it from then on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from flowstore.commands import Commands
from flowstore.decisions import Decision, end_flow
from flowstore.domain import CATALOG_ID, FlowCatalog, FlowInstance, instance_id
from flowstore.errors import FlowStateNotFoundError
from flowstore.keys import UserKeys

__all__ = ["Erasure"]


class Erasure:
    """Erases users through the write path and shreds their keys once the tables caught up."""

    def __init__(self, commands: Commands, keys: UserKeys, catch_up: Callable[[], object]) -> None:
        self._commands = commands
        self._keys = keys
        self._catch_up = catch_up  # brings this process's tables up to its own writes

    def erase_user(self, user_id: str) -> int:
        """Erase every run of the user, shred their key; return how many runs were erased.

        The user's key lock is held throughout: this process's writes for the user wait, then
        find no key and start afresh under a new one (never sealed with the shredded key).
        """
        with self._keys.user_lock(user_id):
            erased = self.erase_instances(user_id)
            self.shred(user_id)
            # A write for the user racing the erasure (another process, with the key in its
            # cache) may have been sealed with the key just shredded: a second pass erases it.
            late = self.erase_instances(user_id)
            if late:
                self.shred(user_id)
        return erased + late

    def erase_instances(self, user_id: str) -> int:
        """Append `FlowErased` to each of the user's instances not erased yet; return how many."""
        commands = self._commands
        catalog = commands.log.get(CATALOG_ID, FlowCatalog)
        erased = 0
        for flow_id in catalog.flow_ids if catalog else ():
            changed = False

            def decide(instance: FlowInstance | None) -> Decision:
                nonlocal changed
                changed = instance is not None and not instance.erased
                if instance is None or not changed:
                    return Decision([])
                return Decision(end_flow(instance, now=commands.clock(), kind="erasure"))

            # Read from the log, not this process's cache: an instance it last saw erased may
            # have been started again by another process, and "nothing to do" appends nothing
            # that a stale version could conflict with.
            commands.forget_instance(instance_id(user_id, flow_id))
            with contextlib.suppress(FlowStateNotFoundError):  # never started this flow
                commands.change_instance(user_id, flow_id, decide, kind="erase", persistent=True)
            erased += changed
        return erased

    def shred(self, user_id: str) -> None:
        """Delete the user's keys, once the tables have applied their erasure events.

        Rows are deleted by instance id whatever the events read with, but the funnel counts the
        erased run as dropped at its step by finding the instance's state row by the user id the
        `FlowErased` event carries, which is the real one only while the key exists.
        """
        self._catch_up()
        self._keys.shred(user_id)
