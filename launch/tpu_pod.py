"""A Cloud TPU VM pod slice (gcloud) or a GKE TPU cluster (xpk): the trainer on every host.

  python launch/tpu_pod.py --tpu=my-pod --zone=us-east5-a --accelerator_type=v5p-128 \
      --setup --repo_url=https://github.com/ORG/skymoe_jax.git \
      --config=configs/my_pod.py:stage1 --workdir=/mnt/shared/runs/stage1 \
      [--config.mesh.fsdp=8 ...] [--dry_run]
  python launch/tpu_pod.py --xpk_cluster=my-cluster --zone=us-east5 --accelerator_type=v5p-128 \
      --num_slices=2 --docker_image=gcr.io/PROJECT/skymoe:latest --config=... --workdir=...

The code is skymoe_jax/jobs/tpu_pod.py.
"""
import sys

from skymoe_jax.jobs import tpu_pod

if __name__ == '__main__':
  sys.exit(tpu_pod.main())
