"""python -m skymoe_jax.aot_compile --config=FILE[:ARG] --topology=v5p:4x4x4 [--num_slices=1]
                                  [--batch_size=144] [--seq_len=2048] [--hlo_out=FILE.hlo.txt.gz]
                                  [--config.FIELD=VALUE ...]

Compiles the full sharded train step ahead of time for a TPU topology on a CPU-only machine
(profiling/aot.py) and prints one JSON object (the last line of stdout): memory per device,
XLA's FLOP count, the model's FLOPs, and the bytes moved by each kind of collective. The mesh's
-1 axes and remat_policy='auto' are resolved for the topology and --batch_size first (a mesh that
cannot work fails then, naming its config field); the report gives what they resolved to.
--num_slices=N: N slices of the topology (a multislice job; config.mesh.dcn_data / dcn_fsdp lay
them out); the report adds the collectives whose device groups cross slices
(cross_slice_collectives). --hlo_out: also write the compiled HLO there (gzip), for reading later.
"""
import gzip
import json
import os

# Before jax is imported: plain CPU jax for everything but the topology (with libtpu installed and
# JAX_PLATFORMS unset, jax would try to open a TPU backend), and no libtpu lockfile: while another
# process holds /tmp/libtpu_lockfile (any jax process started with JAX_PLATFORMS unset), the
# topology call fails with "ABORTED: Internal error when accessing libtpu multi-process lockfile".
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import flags  # noqa: E402

from skymoe_jax import cli  # noqa: E402
from skymoe_jax import storage  # noqa: E402
from skymoe_jax.profiling import aot  # noqa: E402


def define_flags():
  cli.define_config_flag()
  flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5p:4x4x4.')
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology (multislice over DCN).')
  flags.DEFINE_string('hlo_out', '', 'Write the compiled HLO here (gzip text).')
  flags.DEFINE_integer('batch_size', 144, 'Global batch size.')
  flags.DEFINE_integer('seq_len', 0, 'Sequence length (image + text tokens); 0 = '
                       'config.model.llm.max_seq_len.')
  flags.mark_flags_as_required(['topology'])


def main(argv):
  cli.check_no_arguments(argv)
  f = flags.FLAGS
  report, hlo_text = aot.aot_compile(f.config, f.topology, f.batch_size, f.seq_len,
                                     name=cli.config_file(), with_hlo=True,
                                     num_slices=f.num_slices)
  if f.hlo_out:
    storage.write_bytes_atomically(f.hlo_out, gzip.compress(hlo_text.encode()))
  print(json.dumps(report))


if __name__ == '__main__':
  cli.run(main, define_flags)
