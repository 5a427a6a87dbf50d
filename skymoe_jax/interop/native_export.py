"""Export in transformers' own layout: a folder LlavaForConditionalGeneration loads without
trust_remote_code, for the models an existing architecture expresses exactly.

  export_native(params, model_cfg, out)     any parameter tree (LoRA is merged)
  export_workdir(workdir, out, step=None)   a training workdir's checkpoint, tokenizer included
  verify_native(out, params, config)        transformers' logits on the folder vs ours

Dense: the text model is LLaMA: our default export's tensors and config.json, no remote code.
MoE: the text model is Qwen2-MoE, whose decoder layer is ours with three differences that the
export makes exact:
- q/k/v projections have biases in Qwen2-MoE: written as zeros (qkv_bias stays on, so the file
  is also what older transformers releases, which always build the biases, load);
- every sparse block has a shared expert, out = experts + sigmoid(g x) * shared(x): written with
  a width of SHARED_EXPERT_SIZE and all-zero weights, so shared(x) is exactly 0;
- which layers are sparse: mlp_only_layers lists our dense ones (decoder_sparse_step 1); dense
  layers are Qwen2MoeMLP at intermediate_size = llm.mlp_dim, experts moe_intermediate_size.
The router is the same function: softmax over a bias-free linear map of the token, top k,
divided by their sum when norm_topk_prob (our moe.renormalize). Experts are written one tensor
each under Qwen's per-expert names (mlp.experts.E.{gate,up,down}_proj), the layout of the
published Qwen2-MoE checkpoints, which transformers 5 fuses into its 3-D expert tensors on load.

What Qwen2-MoE cannot express is refused before anything is written (NotExpressibleError,
naming the config field): the adaptive router (its logits depend on each sample's task and
granularity, Qwen2-MoE's router sees the token alone), the condition head that predicts them
(model.moe.condition='predicted': LLaVA has no such module), and any model config field this
mapping was not written for (`_HANDLED`): a new field may change the maths, and silently
dropping it would make the export look right while computing something else.

The folder follows our export's rules (to_torch.check_out: a new or empty `out`, --overwrite
replaces an earlier export of ours and nothing else; written aside, then renamed). Its
config.json keeps our `skymoe` section with `native` naming the text architecture, so it is
recognised as an export of ours; the tensors are not in our layout (to_torch.load_export and
torch_model read the default export). Routing in bf16: transformers computes the router logits
in the model dtype, we in fp32, so a near-tie may pick another expert; fp32 matches.
"""
import pathlib
import re
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from skymoe_jax.interop import export_format, hf_repo, to_torch
from skymoe_jax.model import layout, lora, skymoe

SHARED_EXPERT_SIZE = 1  # the zero shared expert's width: the smallest Linear that loads anywhere
TEXT_ARCHITECTURES = {'dense': 'llama', 'moe': 'qwen2_moe'}  # skymoe.native in config.json

# The model config fields the mapping accounts for: they are either written (shapes, norms, RoPE,
# routing) or do not change the function computed (dtypes, layout, kernels, training-only knobs).
_HANDLED = {
    '': ('dtype', 'param_dtype', 'scan_layers', 'remat_policy', 'remat_auto', 'attention_impl'),
    # posemb_init: where the learnt position table started; the table itself is exported.
    # token_posemb: refused below unless 'none' (LLaVA's projector adds no table).
    'vision': ('image_size', 'patch_size', 'width', 'depth', 'num_heads', 'mlp_dim',
               'feature_layer', 'norm_eps', 'posemb_init', 'token_posemb'),
    'llm': ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
            'mlp_dim', 'rope_theta', 'norm_eps', 'tie_embeddings', 'max_seq_len',
            'image_rope'),  # image_rope: refused below unless '1d' (LLaMA's RoPE is 1-D)
    'lora': ('rank', 'alpha', 'targets'),  # merged into the kernels
    # backend / ep_strategy / capacity: how tokens are dispatched; the export is the dropless
    # function (as our generation and verify_export run it). Loss weights: training only.
    # condition, condition_scale: what feeds the adaptive router, refused below with it (a
    # router that is not adaptive has no condition: config.validate allows 'predicted' only
    # with adaptive).
    'moe': ('num_experts', 'top_k', 'layers', 'mlp_dim', 'renormalize', 'backend', 'ep_strategy',
            'capacity_factor', 'ragged_impl', 'ragged_block_size', 'adaptive', 'num_tasks',
            'num_granularities', 'condition_dim', 'condition_scale', 'condition',
            'load_balance_weight', 'z_loss_weight'),
}


# Options the native layout computes only at their LLaVA value: (section, field, value, why not).
_LLAVA_ONLY = (
    ('vision', 'token_posemb', 'none',
     "LLaVA's projector adds no position table to the image tokens"),
    ('llm', 'image_rope', '1d',
     "LLaMA's and Qwen2-MoE's rotary positions are one index per token, with no row and column "
     'for the image tokens'),
)


class NotExpressibleError(to_torch.ExportError):
  """The model is not exactly an existing transformers architecture; names the config field."""


def check_native(model_cfg) -> None:
  """Raises NotExpressibleError unless the native layout computes exactly our model."""
  plain = to_torch.plain_config(model_cfg)
  for section, known in _HANDLED.items():
    fields = plain.get(section, {}) if section else [k for k in plain if k not in _HANDLED]
    unknown = sorted(set(fields) - set(known))
    if unknown:
      name = 'model.' + (f'{section}.' if section else '') + unknown[0]
      raise NotExpressibleError(
          f'{name}: the native export does not know this config field, so it cannot vouch '
          'that transformers computes the same model; export with the default layout '
          '(--layout=skymoe), or add the field to native_export._HANDLED once the mapping is '
          'checked exact for it')
  for section, field, plain, why in _LLAVA_ONLY:
    value = model_cfg[section].get(field, plain)
    if value != plain:
      raise NotExpressibleError(
          f'model.{section}.{field}={value!r}: {why}; export with the default layout '
          f"(--layout=skymoe), or train with model.{section}.{field}={plain!r}")
  m = model_cfg.moe
  if skymoe.predicts_condition(model_cfg):
    raise NotExpressibleError(
        "model.moe.condition='predicted': the condition head that predicts the adaptive "
        "router's task and granularity from the prompt has no place in transformers' LLaVA / "
        'Qwen2-MoE (no such module, and a router that sees the token alone); export with the '
        'default layout (--layout=skymoe, loaded with trust_remote_code), which carries the '
        'head')
  if m.num_experts > 0 and m.adaptive:
    raise NotExpressibleError(
        'model.moe.adaptive=True: the adaptive router adds a task- and granularity-dependent '
        'bias U(e_task + e_granularity) to the router logits, which Qwen2-MoE\'s router (a '
        'linear map of the token alone) cannot express; export with the default layout '
        '(--layout=skymoe, loaded with trust_remote_code), or train with '
        'model.moe.adaptive=False')


def qwen2_moe_text_config(model_cfg, llama_text: dict) -> dict:
  """text_config of model_type qwen2_moe, from the LLaMA one to_torch.hf_config writes."""
  m, n = model_cfg.moe, model_cfg.llm.num_layers
  sparse = set(layout.moe_layers(model_cfg))
  text = {k: v for k, v in llama_text.items() if k not in ('attention_bias', 'mlp_bias')}
  text.update(
      model_type='qwen2_moe', num_experts=int(m.num_experts), num_experts_per_tok=int(m.top_k),
      norm_topk_prob=bool(m.renormalize),
      moe_intermediate_size=int(m.mlp_dim or model_cfg.llm.mlp_dim),
      shared_expert_intermediate_size=SHARED_EXPERT_SIZE,
      decoder_sparse_step=1, mlp_only_layers=[i for i in range(n) if i not in sparse],
      qkv_bias=True, use_sliding_window=False, attention_dropout=0.0,
      output_router_logits=False)
  return text


def native_config(model_cfg, dtype: str = 'float32', image_token_index: int = 0,
                  extra: Optional[dict] = None) -> dict:
  """config.json: a LlavaConfig whose text_config is LLaMA (dense) or Qwen2-MoE, plus the
  `skymoe` section (our model config, `native`: the text architecture)."""
  moe = model_cfg.moe.num_experts > 0
  config = to_torch.hf_config(model_cfg, dtype, image_token_index, extra)
  config.pop('auto_map', None)  # native: no remote code, whatever the default export points at
  config.update(architectures=['LlavaForConditionalGeneration'], model_type='llava')
  if moe:
    config['text_config'] = qwen2_moe_text_config(model_cfg, config['text_config'])
  config['skymoe']['native'] = TEXT_ARCHITECTURES['moe' if moe else 'dense']
  return config


def qwen2_moe_name(name: str) -> str:
  """Our (Mixtral-style) MoE tensor name -> Qwen2-MoE's; other names unchanged."""
  if '.block_sparse_moe.' not in name:
    return name
  name = name.replace('.block_sparse_moe.', '.mlp.')
  for ours, theirs in (('w1', 'gate_proj'), ('w3', 'up_proj'), ('w2', 'down_proj')):
    name = re.sub(rf'(\.experts\.\d+)\.{ours}\.weight$', rf'\1.{theirs}.weight', name)
  return name


def _zeros(name: str, shape, dtype) -> to_torch.Tensor:
  return to_torch.Tensor(name, tuple(shape), dtype, lambda: np.zeros(shape, dtype))


def native_tensors(params, model_cfg, dtype: str = 'float32') -> List[to_torch.Tensor]:
  """The native layout's tensors, fetched lazily: our export's (to_torch.export_tensors, which
  checks every parameter against the table), renamed for Qwen2-MoE, with the zero q/k/v biases
  and zero shared experts it needs."""
  tensors = to_torch.export_tensors(params, model_cfg, dtype)
  if model_cfg.moe.num_experts == 0:
    return tensors
  d = model_cfg.llm.embed_dim
  out = []
  for t in tensors:
    t = t._replace(name=qwen2_moe_name(t.name))
    out.append(t)
    if re.search(r'^language_model\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight$', t.name):
      out.append(_zeros(t.name[:-len('weight')] + 'bias', (t.shape[0],), t.dtype))
    elif t.name.endswith('.mlp.gate.weight'):  # a sparse block's router: its shared expert
      shared = t.name[:-len('gate.weight')]
      out += [_zeros(shared + 'shared_expert.gate_proj.weight', (SHARED_EXPERT_SIZE, d), t.dtype),
              _zeros(shared + 'shared_expert.up_proj.weight', (SHARED_EXPERT_SIZE, d), t.dtype),
              _zeros(shared + 'shared_expert.down_proj.weight', (d, SHARED_EXPERT_SIZE), t.dtype),
              _zeros(shared + 'shared_expert_gate.weight', (1, d), t.dtype)]
  left = [t.name for t in out if 'block_sparse_moe' in t.name]
  if left:  # the name table changed under this mapping: refuse, never write a half-renamed file
    raise to_torch.ExportError(f'tensor {left[0]} has no Qwen2-MoE name (native_export.'
                               'qwen2_moe_name does not know it)')
  return out


def generation_config_writer(copies: Optional[Dict[str, pathlib.Path]]) -> Callable:
  """write_more for to_torch.write_export: generation_config.json (greedy, the tokenizer's eos)
  beside the weights, so transformers' generate() stops at the end of the answer."""
  tokenizer_path = (copies or {}).get(export_format.TOKENIZER_FILE)
  tokenizer = to_torch.read_tokenizer(tokenizer_path) if tokenizer_path else None
  return lambda folder: hf_repo.write_generation_config(folder, tokenizer)


def export_native(params, model_cfg, out, dtype: str = 'float32',
                  max_shard_bytes: int = to_torch.DEFAULT_MAX_SHARD_BYTES,
                  image_token_index: int = 0, extra: Optional[dict] = None,
                  overwrite: bool = False, copies: Optional[Dict[str, pathlib.Path]] = None,
                  workdir=None, data_cfg=None) -> Dict:
  """Writes `params` (LoRA merged) in the native layout as the folder `out`; arguments and
  result as to_torch.export_params (data_cfg unused: the native folder has no processor of
  ours). Raises NotExpressibleError (nothing written) when the model is not exactly
  LLaVA-LLaMA / LLaVA-Qwen2-MoE."""
  del data_cfg
  start = time.perf_counter()
  dtype = to_torch.DTYPES.get(dtype, dtype)
  check_native(model_cfg)
  out = to_torch.check_out(out, overwrite, workdir)
  if model_cfg.lora.rank > 0:
    params = lora.merge_lora(params, model_cfg.lora.alpha)
  tensors = native_tensors(params, model_cfg, dtype)
  config = native_config(model_cfg, dtype, image_token_index, extra)
  files = to_torch.write_export(out, tensors, config, max_shard_bytes, copies, overwrite,
                                workdir, generation_config_writer(copies))
  return {'files': files, 'num_tensors': len(tensors),
          'total_bytes': sum(t.nbytes for t in tensors),
          'seconds': time.perf_counter() - start}


def export_workdir(workdir, out, step: Optional[int] = None, dtype: str = 'float32',
                   max_shard_bytes: int = to_torch.DEFAULT_MAX_SHARD_BYTES,
                   image_token_index: Optional[int] = None, overwrite: bool = False) -> Dict:
  """to_torch.export_workdir in the native layout (refused before the restore when inexact)."""
  return to_torch.export_workdir(workdir, out, step, dtype, max_shard_bytes, image_token_index,
                                 overwrite, write=export_native, check=check_native)


def verify_native(out, params, config, adapter: Optional[str] = None, batch: int = 2,
                  text_len: int = 16, seed: int = 0) -> float:
  """Max |logit difference| between transformers' LlavaForConditionalGeneration on the native
  export `out` (no remote code; with `adapter`, a PEFT adapter folder) and our model."""
  return to_torch.verify_hf_export(out, params, config, batch, text_len, seed, native=True,
                                   adapter=adapter)
