"""Which Ray a training run uses, and stopping only the Ray it started.

  embedded default   a private Ray started in this process: its own temp dir (short: Unix socket paths are
                     limited to 107 bytes), bound to 127.0.0.1, no dashboard; stopped and removed afterwards.
  --ray-address ADDR connect to a running cluster ("auto" inside a Ray job); disconnect afterwards, the
                     cluster keeps running.
  already connected  (a caller's, e.g. the tests' session fixture): used as it is and left running.

Without the dashboard the state API is absent, and Ray Train's placement-group cleaner (an actor of every
TorchTrainer run) warns about that about once a second for the whole run; the private instance's workers
silence that one logger (`quiet_state_api_warnings`), which changes nothing else.

Ray 2.60 checks authentication tokens when RAY_AUTH_MODE=token; cluster and clients must agree, so the mode is
always set explicitly: what the environment says, else `disabled` (`DEFAULT_AUTH_MODE`; a loopback-only
Ray). A cluster started with token mode needs RAY_AUTH_MODE=token (and its token) in the client's environment.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_AUTH_MODE = "disabled"
LOOPBACK = "127.0.0.1"
# Ray turns a node IP of 127.0.0.1 into the machine's address (services.resolve_ip_for_localhost) and then
# listens there: the only switch that keeps a single-node Ray on loopback is its "no cluster" mode, which Ray
# reads once, when it is imported.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ensure_auth_mode() -> str:
    """Set RAY_AUTH_MODE (before ray is imported or started) unless the environment already does."""
    return os.environ.setdefault("RAY_AUTH_MODE", DEFAULT_AUTH_MODE)


def quiet_state_api_warnings() -> None:
    """Worker setup hook of the private instance (see the module docstring)."""
    import logging
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                object_store_bytes: int = 256 * 2**20) -> Iterator[None]:
    """Ray for the block: connected to `address`, or a private in-process instance with `num_cpus` CPUs."""
    ensure_auth_mode()
    if not address and "ray" not in sys.modules:
        os.environ[_SINGLE_NODE_ENV] = "0"
    import ray
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()  # a driver connected to a cluster only disconnects
        return
    temp_dir = tempfile.mkdtemp(prefix="copl-ray-", dir="/tmp")
    try:
        # address="local": a new instance even where RAY_ADDRESS names a cluster
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=temp_dir, _node_ip_address=LOOPBACK, object_store_memory=object_store_bytes,
                 log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "trainer.ray_runtime.quiet_state_api_warnings"})
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOOPBACK:   # ray was imported before this session could keep it on loopback
            ray.shutdown()
            raise RuntimeError(f"the private Ray would listen on {node_ip}, not {LOOPBACK}: start it before "
                               "anything imports ray, or pass --ray-address")
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
