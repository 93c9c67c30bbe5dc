"""Multi-process (multi-host) start-up through jax.distributed, driven by config or environment.

Must run before anything touches a JAX device: afterwards, jax.devices() lists the devices of
every process, and each process feeds only its own slice of every batch.
"""

import os
import socket
import time

import jax
import ml_collections


class DistributedError(RuntimeError):
  """The processes of a multi-process job could not connect."""


def cluster_detected() -> bool:
  """Whether the environment is a multi-process job that jax.distributed configures itself."""
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1')) > 1
          or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
          or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))


def initialize(dist: ml_collections.ConfigDict) -> None:
  """Joins the job described by config.distributed (or detected); a no-op for one process."""
  if jax.distributed.is_initialized():
    return
  if not dist.coordinator_address and not cluster_detected():
    return
  auto = dist.coordinator_address in ('', 'auto')
  if not auto and dist.process_id != 0:
    _wait_for_coordinator(dist)
  # CPU devices need a collectives backend to talk across processes (GPUs/TPUs have their own).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    if not auto:
      jax.distributed.initialize(
          coordinator_address=dist.coordinator_address, num_processes=dist.num_processes,
          process_id=dist.process_id, initialization_timeout=dist.initialization_timeout)
    else:
      jax.distributed.initialize(initialization_timeout=dist.initialization_timeout)
  except Exception as e:  # pylint: disable=broad-except
    where = ('the cluster JAX detects (Cloud TPU, SLURM, Open MPI, ...)' if auto else
             f'coordinator {dist.coordinator_address} as process {dist.process_id} of '
             f'{dist.num_processes}')
    raise DistributedError(
        f'could not join {where} within config.distributed.initialization_timeout='
        f'{dist.initialization_timeout}s: {type(e).__name__}: {str(e).splitlines()[0]}') from e


def _wait_for_coordinator(dist: ml_collections.ConfigDict) -> None:
  """Waits until the coordinator accepts connections, or raises DistributedError.

  JAX's own client aborts the whole process (no Python exception) when it cannot reach the
  coordinator in time, so the reachability check happens here first.
  """
  where = (f'coordinator {dist.coordinator_address} as process {dist.process_id} of '
           f'{dist.num_processes}')
  host, _, port = dist.coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise DistributedError(
        f'config.distributed.coordinator_address={dist.coordinator_address!r}: expected HOST:PORT')
  deadline = time.monotonic() + dist.initialization_timeout
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f'could not join {where} within config.distributed.initialization_timeout='
            f'{dist.initialization_timeout}s: nothing accepted a connection there ({e})') from e
      time.sleep(0.5)
