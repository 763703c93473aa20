"""kopf wiring: kopf runs the operator's process (event loop, login, startup and cleanup, the health
endpoint) and hands the controller (controller.py) its loop through the memo (cli.py).

kopf watches nothing here: the two watches, LingDeployments and the operator's pods, are the
operator's own (watch.py), because kopf's per-event machinery cost more CPU than the operator's work
on the events (docs/operator.md, "Why the watches are ours"). So kopf writes nothing on the objects
either: no finalizers, no annotations, and two replicas can run side by side; only the Lease holder
(leader.py) acts.
"""

from __future__ import annotations

from typing import Any

import kopf

from ling_operator.controller import Controller


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # We write our own events; kopf must not post its handler logs as events from both replicas.
    settings.posting.enabled = False
    # Every request has a timeout (issue 18), kopf's own too.
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    controller: Controller = memo["controller"]
    await controller.start()


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo["controller"].stop()


@kopf.on.probe(id="leader")
def _leader_probe(memo: kopf.Memo, **_: Any) -> bool:
    return bool(memo["controller"].elector.is_leader)
