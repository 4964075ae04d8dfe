"""The Ray side of a launch: connect or start a cluster, reserve one bundle per host.

A local instance started here is for one machine only: every Ray server listens on
127.0.0.1, token authentication is on (a fresh token for this instance, kept in this
process's environment, never written to disk), no dashboard runs and no port answers
without the token: Ray's Prometheus metrics servers (the dashboard agent's export port,
the autoscaler's and the dashboard head's) are not started. Its session directory lives
in a temporary directory of its own, removed by `disconnect`.
"""

import dataclasses
import os
import secrets
import shutil
import socket
import tempfile
import time

from scaler.errors import UserError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass
class Reservation:
  pg: object                # ray.util.placement_group.PlacementGroup
  bundle: dict              # resources of one host
  platform: str             # cpu (simulated devices) | gpu | tpu
  devices: int              # devices per host


def _loopback_only() -> None:
  # Ray takes its node address from the route to the internet unless told that this is a
  # single-machine cluster; then every server binds to the loopback address. Read when
  # `ray` is imported, and inherited by every Ray process started from here.
  os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _check_reachable(address: str) -> None:
  """Fails in seconds where ray.init would retry for a minute."""
  host, sep, port = address.rpartition(":")
  host = host.split("://")[-1].strip("[]")
  if not sep or not port.isdigit():
    raise UserError(f"--address {address}: expected host:port (the Ray head's GCS port, "
                    "e.g. 10.0.0.1:6379) or 'auto'")
  try:
    socket.create_connection((host, int(port)), timeout=5).close()
  except OSError as e:
    raise UserError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}; is the "
                    "head node up (`ray status` on it) and the port open?") from None


def connect(address: str | None, hosts: int) -> bool:
  """Connects to `address`, else to RAY_ADDRESS (inside `ray job submit`), else starts a
  local instance; True when the instance is local."""
  quiet = dict(configure_logging=False, log_to_driver=False, namespace="scaler")
  source = "--address" if address else "RAY_ADDRESS"
  address = address or os.environ.get("RAY_ADDRESS")
  if address:
    if address != "auto":
      _check_reachable(address)
      if address.split("://")[-1].rpartition(":")[0].strip("[]") in _LOOPBACK:
        _loopback_only()
    import ray
    try:
      ray.init(address=address, **quiet)
    except Exception as e:  # ConnectionError, AuthenticationError, version mismatch ...
      raise UserError(f"cannot connect to the Ray cluster at {address} ({source}): "
                      f"{type(e).__name__}: {e}") from None
    return False
  _loopback_only()
  os.environ["RAY_AUTH_MODE"] = "token"
  os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
  os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
  _no_metrics_servers()
  # Short: Ray's socket paths under it must stay within 107 bytes.
  _session_root[0] = tempfile.mkdtemp(prefix="scaler-ray-", dir="/tmp")
  import ray
  ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=_session_root[0],
           **quiet)
  return True


_session_root = [None]   # the local instance's temporary directory, while it runs


def _no_metrics_servers() -> None:
  """Keeps Ray's Prometheus endpoints, which answer anyone, from starting.

  The dashboard agent serves metrics only with metrics collection on. The autoscaler
  monitor and the dashboard head (which runs, without its web frontend, also with
  include_dashboard=False) start theirs on a port read from these variables and carry on
  without them when it cannot be bound, as when another instance holds it; an invalid
  port makes that certain. Read by the Ray processes this one starts.
  """
  os.environ["RAY_enable_metrics_collection"] = "0"
  os.environ["AUTOSCALER_METRIC_PORT"] = "-1"
  os.environ["DASHBOARD_METRIC_PORT"] = "-1"


def disconnect() -> None:
  """Leaves the cluster; a local instance stops and its session directory goes."""
  import ray
  ray.shutdown()
  if _session_root[0] is not None:
    shutil.rmtree(_session_root[0], ignore_errors=True)
    _session_root[0] = None


def _platform(resources: dict) -> str:
  return "tpu" if resources.get("TPU") else "gpu" if resources.get("GPU") else "cpu"


def _describe(nodes) -> str:
  def one(r):
    keys = [k for k in ("CPU", "GPU", "TPU") if r.get(k)]
    return "{" + ", ".join(f"{k}: {r[k]:g}" for k in keys) + "}"
  return ", ".join(one(n["Resources"]) for n in nodes) or "none"


def _fit(bundle: dict, resources: dict) -> int:
  """How many copies of `bundle` fit into `resources`."""
  return int(min(resources.get(k, 0) // v for k, v in bundle.items() if v > 0))


def _missing(bundle, hosts, strategy, nodes, key="Resources") -> str | None:
  """What the cluster lacks for the placement group, or None when it fits."""
  fits = [_fit(bundle, n[key]) for n in nodes]
  have = sum(min(f, 1) for f in fits) if strategy == "STRICT_SPREAD" else sum(fits)
  if have >= hosts:
    return None
  per = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
  where = "distinct nodes each with" if strategy == "STRICT_SPREAD" else "bundles of"
  return (f"{hosts} hosts need {hosts} {where} {{{per}}}; the cluster can give {have} "
          f"(its {len(nodes)} node(s): {_describe(nodes)})")


def reserve(hosts: int, devices: int | None, local: bool, timeout_s: float) -> Reservation:
  """One bundle per host, gang-scheduled: all of them or a clear error, never a hang."""
  import ray
  from ray.util import placement_group, remove_placement_group

  nodes = [n for n in ray.nodes() if n["Alive"]]
  platform = _platform(ray.cluster_resources())
  if platform == "cpu":
    # Simulated devices: one CPU per host, packed onto as few machines as possible.
    devices = devices or 1
    bundle, strategy = {"CPU": 1.0}, "PACK"
  else:
    key = platform.upper()
    devices = devices or int(max(n["Resources"].get(key, 0) for n in nodes))
    bundle, strategy = {"CPU": 1.0, key: float(devices)}, "STRICT_SPREAD"
  if devices < 1:
    raise UserError(f"--devices-per-host {devices}: needs at least 1")
  missing = _missing(bundle, hosts, strategy, nodes)
  if missing and local:  # nothing will join a local instance: no point in waiting
    raise UserError(f"not enough resources: {missing}. Use fewer --hosts.")
  pg = placement_group([dict(bundle) for _ in range(hosts)], strategy=strategy,
                       name=f"scaler-{os.getpid()}")
  ready = pg.wait(timeout_seconds=timeout_s)
  if not ready:
    remove_placement_group(pg)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    missing = _missing(bundle, hosts, strategy, nodes) or (
        f"{hosts} x {bundle} did not fit into the resources left free by other jobs")
    raise UserError(f"the cluster did not grant all {hosts} hosts within {timeout_s:.0f} s "
                    f"(--placement-timeout): {missing}")
  return Reservation(pg, bundle, platform, devices)


def wait_ready(res: Reservation, timeout_s: float) -> None:
  """Before a restart: bundles of a lost node are placed again, or a clear error."""
  t0 = time.monotonic()
  if not res.pg.wait(timeout_seconds=timeout_s):
    raise UserError(f"after a failure the cluster did not give back all hosts within "
                    f"{time.monotonic() - t0:.0f} s (a node lost for good?)")
