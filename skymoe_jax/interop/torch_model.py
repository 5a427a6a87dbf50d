"""SkyMoE in plain PyTorch: loads an exported folder (to_torch.py) and runs it.

It needs torch and the safetensors package, nothing of JAX or of the rest of this project but
export_format.py (plain Python, imported relatively), which reads and checks the folder's
config.json the same way the JAX side does: a damaged or foreign folder raises one LoadError
naming the file. So this very file is also shipped into every export folder, where
modeling_skymoe.py (transformers' remote code) builds on it: one home for the PyTorch model,
in the repository and in the exported Hugging Face repository alike. Which decoder layers are
MoE comes from the export's `skymoe.moe_layers` (written from model/layout.py). Module names
mirror the export's tensor names, so loading copies each file's tensors, one at a time, into the
parameter of the same name (every parameter must be filled, every tensor used):

  vision_tower.vision_model.*        CLIP ViT (quick-GELU, pre-LN); features = the output of the
                                     last block, CLS dropped; other input sizes resize the
                                     position grid bicubically, as the JAX tower does
  multi_modal_projector.linear_1/2   LLaVA-1.5's 2-layer MLP with exact GELU
  language_model.model.*             LLaMA decoder: RMSNorm, RoPE (rotate halves; with
                                     llm.image_rope='2d' the image tokens' on the patch grid),
                                     GQA, SwiGLU
  ...layers.{i}.block_sparse_moe.*   in MoE layers: fp32 router, softmax over all experts, top-k,
                                     raw or renormalised weights, plus the adaptive bias
                                     condition_proj(task_embed[task] + granularity_embed[gran])
  language_model.lm_head             absent when the embeddings are tied
  condition_head                     with model.moe.condition='predicted' only: the Linear that
                                     predicts the router's task and granularity from the prompt

The maths follows the JAX model step by step (image tokens first, then text; RoPE positions
count real tokens only; statistics and softmaxes in fp32), so in float32 the logits agree to
rounding. Inputs: images [B, 3, H, W] normalised pixels (torch's channel-first layout), tokens
and token_mask [B, T], task_id and granularity_id [B].

The router's condition is either the tags (task_id and granularity_id: rows of the embedding
tables) or, for a model exported with model.moe.condition='predicted', the condition head's
prediction (model/skymoe.py, predict_condition): the mean embedding of the prompt's text tokens,
scaled to unit RMS, one Linear times the export's `skymoe.condition_head.logit_scale`, a softmax
over tasks and one over granularities, whose probabilities mix the embedding tables (p_task @
task_embed + p_gran @ granularity_embed). Such a model predicts when it is given no ids, and
routes by the ids when given both (the tags, as the JAX model with condition=(task_id,
granularity_id)). `generate` predicts once from the prompt and routes every new token by it, as
the JAX generator does.

The decoder (`decode`) runs on any key/value cache with transformers' Cache interface
(`update(k, v, layer)`, `get_seq_length()`): `KVCache` here, transformers' DynamicCache under
generate(). `generate` decodes greedily, right-aligning each row's real tokens like the JAX
generator so one cache index serves the batch.
"""
import json
import math
import pathlib
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import safetensors
import torch
from torch import nn
import torch.nn.functional as F

# Relative, so that the file runs the same in skymoe_jax/interop/ and in an export folder
# (transformers copies a remote module's relative imports along with it).
from .export_format import INDEX_FILE, WEIGHTS_FILE, predicts_condition, read_config


class LoadError(ValueError):
  """An export folder or file is missing, truncated or malformed (the message names it)."""


def _load_error(path, error, name: Optional[str] = None) -> LoadError:
  """The safetensors library's error as a LoadError naming the file (and tensor)."""
  reason = str(error)
  hint = (' (truncated, or not a safetensors file)'
          if 'not fully covered' in reason or 'invalid header length' in reason else
          ' (tensors\' byte ranges overlap or leave gaps: a damaged or hand-made header)'
          if 'invalid offset' in reason else '')
  where = f'{path}: tensor {name!r}' if name is not None else str(path)
  return LoadError(f'{where}: {reason}{hint}')


def iter_safetensors(path) -> Iterator[Tuple[str, torch.Tensor]]:
  """(name, tensor) of a .safetensors file, read one at a time through the safetensors library.

  safe_open checks the header against the file size up front, so a truncated file fails before
  the first tensor; pread rather than a memory map, so a file cut short later raises instead of
  killing the process.
  """
  path = pathlib.Path(path)
  try:
    with safetensors.safe_open(path, framework='pt', backend='pread') as f:
      names = f.offset_keys()
      for name in names:
        try:
          tensor = f.get_tensor(name)
        except safetensors.SafetensorError as e:
          raise _load_error(path, e, name) from None
        yield name, tensor
  except safetensors.SafetensorError as e:
    raise _load_error(path, e) from None


def read_safetensors(path) -> Dict[str, torch.Tensor]:
  """All tensors of a .safetensors file (errors as iter_safetensors)."""
  return dict(iter_safetensors(path))


def export_files(folder) -> Tuple[dict, List[pathlib.Path]]:
  """(config.json, its safetensors files) of an export folder, single file or sharded."""
  folder = pathlib.Path(folder)
  config = read_config(folder, LoadError)  # names the file and field at fault
  index = folder / INDEX_FILE
  if (folder / WEIGHTS_FILE).exists():
    files = [folder / WEIGHTS_FILE]
  elif index.exists():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
      files = [folder / name for name in sorted(set(weight_map.values()))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise LoadError(f'{index}: not a checkpoint index ({type(e).__name__}: {e})') from None
  else:
    raise LoadError(f'{folder}: neither model.safetensors nor {index.name}')
  for path in files:
    if not path.exists():
      raise LoadError(f'{path}: listed in the index but missing')
  return config, files


def _namespace(d):
  if isinstance(d, dict):
    return SimpleNamespace(**{k: _namespace(v) for k, v in d.items()})
  return d


# ------------------------------------------------------------------------------ vision


def _attend(q, k, v, mask):
  """q [B, T, H, Dh], k/v [B, S, Hkv, Dh], mask bool [B, T, S] -> [B, T, H, Dh]; fp32 softmax."""
  b, t, h, dh = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, dh)
  logits = torch.einsum('btkgd,bskd->bkgts', q.float(), k.float()) / math.sqrt(dh)
  logits = logits.masked_fill(~mask[:, None, None], torch.finfo(torch.float32).min)
  probs = torch.softmax(logits, dim=-1).to(v.dtype)
  return torch.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, h, dh)


def _layer_norm(norm: nn.LayerNorm, x):
  """LayerNorm with fp32 statistics, as the JAX model."""
  return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                      norm.eps).to(x.dtype)


class ClipAttention(nn.Module):
  def __init__(self, width, heads):
    super().__init__()
    self.heads = heads
    self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
    self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

  def forward(self, x):
    b, t, w = x.shape
    split = lambda y: y.reshape(b, t, self.heads, w // self.heads)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    mask = torch.ones(1, t, t, dtype=torch.bool, device=x.device)
    return self.out_proj(_attend(q, k, v, mask).reshape(b, t, w))


class ClipMLP(nn.Module):
  def __init__(self, width, mlp_dim):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

  def forward(self, x):
    h = self.fc1(x)
    return self.fc2(h * torch.sigmoid(1.702 * h))  # quick GELU


class ClipLayer(nn.Module):
  def __init__(self, v):
    super().__init__()
    self.self_attn = ClipAttention(v.hidden_size, v.num_attention_heads)
    self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
    self.mlp = ClipMLP(v.hidden_size, v.intermediate_size)
    self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

  def forward(self, x):
    x = x + self.self_attn(_layer_norm(self.layer_norm1, x))
    return x + self.mlp(_layer_norm(self.layer_norm2, x))


class ClipEmbeddings(nn.Module):
  def __init__(self, v):
    super().__init__()
    self.patch_size, self.grid = v.patch_size, v.image_size // v.patch_size
    self.class_embedding = nn.Parameter(torch.zeros(v.hidden_size))
    self.patch_embedding = nn.Conv2d(3, v.hidden_size, v.patch_size, v.patch_size, bias=False)
    self.position_embedding = nn.Embedding(1 + self.grid ** 2, v.hidden_size)

  def positions(self, grid: int):
    """The stored positions resized to `grid` (bicubic, align_corners=False, CLS kept)."""
    pos = self.position_embedding.weight
    if grid == self.grid:
      return pos
    g = pos[1:].float().reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None]
    g = F.interpolate(g, size=(grid, grid), mode='bicubic', align_corners=False)
    return torch.cat([pos[:1], g[0].permute(1, 2, 0).reshape(grid * grid, -1).to(pos.dtype)])

  def forward(self, images):
    b, _, h, w = images.shape
    if h != w or h % self.patch_size:
      raise ValueError(f'images must be square multiples of {self.patch_size}, got {h}x{w}')
    x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))
    x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, W], row-major patches
    cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
    return torch.cat([cls, x], dim=1) + self.positions(h // self.patch_size).to(x.dtype)


class ClipEncoder(nn.Module):
  def __init__(self, v):
    super().__init__()
    self.layers = nn.ModuleList(ClipLayer(v) for _ in range(v.num_hidden_layers))


class ClipVisionModel(nn.Module):
  def __init__(self, v):
    super().__init__()
    self.embeddings = ClipEmbeddings(v)
    self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
    self.encoder = ClipEncoder(v)
    self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # unused (LLaVA)

  def forward(self, images):
    """Patch features of the last block, CLS dropped: [B, grid^2, W]."""
    x = _layer_norm(self.pre_layrnorm, self.embeddings(images))
    for layer in self.encoder.layers:
      x = layer(x)
    return x[:, 1:]


class VisionTower(nn.Module):
  def __init__(self, v):
    super().__init__()
    self.vision_model = ClipVisionModel(v)

  def forward(self, images):
    return self.vision_model(images)


def token_position_table(grid: int, width: int) -> torch.Tensor:
  """[grid^2, width]: model/projector.py's fixed 2-D sin-cos table at unit RMS, per row-major
  patch sin/cos of its row, then of its column, at width/4 geometric frequencies (this file
  ships alone, so it is written again here; tests/test_export.py checks the two agree)."""
  omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
  y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
  ay, ax = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
  table = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).float()
  return math.sqrt(2.0) * table


class Projector(nn.Module):
  """LLaVA-1.5's 2-layer MLP; with token_posemb='sincos2d' the fixed position table is added to
  its output, computed from the config at each call: not a tensor of the export, and not a
  buffer either, since transformers builds remote-code models on the meta device and fills only
  the file's tensors, which left a non-persistent buffer uninitialised (NaN)."""

  def __init__(self, vision_width, dim, grid, token_posemb='none'):
    super().__init__()
    self.linear_1, self.linear_2 = nn.Linear(vision_width, dim), nn.Linear(dim, dim)
    if token_posemb not in ('none', 'sincos2d'):
      raise ValueError(f"vision.token_posemb={token_posemb!r}: not 'none' or 'sincos2d'")
    self.table_grid = grid if token_posemb == 'sincos2d' else 0

  def forward(self, x):
    y = self.linear_2(F.gelu(self.linear_1(x)))
    if not self.table_grid:
      return y
    return y + token_position_table(self.table_grid, y.shape[-1]).to(y.device, y.dtype)


# ----------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


def image_grid(cfg) -> int:
  """model/decoder.py's image_grid: the patch grid of 2-D image positions, 0 for 1-D ones."""
  v = cfg.vision
  return v.image_size // v.patch_size if getattr(cfg.llm, 'image_rope', '1d') == '2d' else 0


def rotary_positions(positions, image_grid: int):
  """model/rope.py's: 1-D positions [B, T] -> (row, column) positions; with a grid g the first
  g^2 are the image's row-major patches and the text follows from g on both axes."""
  if not image_grid:
    return positions, positions
  text = positions - image_grid * image_grid + image_grid
  is_image = positions < image_grid * image_grid
  return (torch.where(is_image, positions // image_grid, text),
          torch.where(is_image, positions % image_grid, text))


def apply_rope(x, positions, theta, image_grid: int = 0):
  """x [B, T, H, Dh], positions [B, T]: the LLaMA half-rotation, angles in fp32; with an image
  grid the even frequencies turn by the row, the odd ones by the column."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh))
  rows, cols = rotary_positions(positions, image_grid)
  by_row = torch.arange(dh // 2, device=x.device) % 2 == 0
  angles = torch.where(by_row, rows[:, :, None], cols[:, :, None]).float() * inv_freq
  cos, sin = torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]
  x1, x2 = x.float()[..., :dh // 2], x.float()[..., dh // 2:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class KVCache:
  """Keys and values of every layer, [B, Hkv, S, Dh] grown along S, behind the two methods of
  transformers' Cache the decoder uses, so `decode` runs on this and on a DynamicCache alike."""

  def __init__(self):
    self.layers: List[Tuple[torch.Tensor, torch.Tensor]] = []

  def update(self, k, v, layer_idx: int, *args, **kwargs):
    del args, kwargs  # transformers' Cache takes extra arguments this one does not need
    if layer_idx == len(self.layers):
      self.layers.append((k, v))
    else:
      old_k, old_v = self.layers[layer_idx]
      self.layers[layer_idx] = (torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2))
    return self.layers[layer_idx]

  def get_seq_length(self, layer_idx: int = 0) -> int:
    return self.layers[layer_idx][0].shape[2] if layer_idx < len(self.layers) else 0


class Attention(nn.Module):
  def __init__(self, llm, layer_idx: int, image_grid: int = 0):
    super().__init__()
    d, self.h, self.hkv, self.dh = llm.embed_dim, llm.num_heads, llm.num_kv_heads, llm.head_dim
    self.theta, self.layer_idx, self.image_grid = llm.rope_theta, layer_idx, image_grid
    self.q_proj = nn.Linear(d, self.h * self.dh, bias=False)
    self.k_proj = nn.Linear(d, self.hkv * self.dh, bias=False)
    self.v_proj = nn.Linear(d, self.hkv * self.dh, bias=False)
    self.o_proj = nn.Linear(self.h * self.dh, d, bias=False)

  def forward(self, x, positions, mask, cache=None):
    """mask [B, T, S] over the cache's slots then the new ones; the new keys and values are
    appended to `cache` (a KVCache or a transformers Cache) when one is given."""
    b, t, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, t, self.h, self.dh), positions, self.theta,
                   self.image_grid)
    k = apply_rope(self.k_proj(x).reshape(b, t, self.hkv, self.dh), positions, self.theta,
                   self.image_grid)
    v = self.v_proj(x).reshape(b, t, self.hkv, self.dh)
    if cache is not None:  # caches hold [B, Hkv, S, Dh], transformers' layout
      k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
      k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = _attend(q, k, v, mask).reshape(b, t, self.h * self.dh)
    return self.o_proj(out)


class MLP(nn.Module):
  """SwiGLU with LLaMA's names (dense layers)."""

  def __init__(self, d, f):
    super().__init__()
    self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
    self.down_proj = nn.Linear(f, d, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
  """SwiGLU with Mixtral's names: w1 gate, w3 up, w2 down."""

  def __init__(self, d, f):
    super().__init__()
    self.w1, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
    self.w2 = nn.Linear(f, d, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


def mix_condition(table: nn.Embedding, condition) -> torch.Tensor:
  """The condition embedding [B, C] fp32 of `condition`: ids [B] -> the table's rows (the tag
  path), or distributions [B, N] -> condition @ table (the predicted condition's soft mix)."""
  if not torch.is_floating_point(condition):
    return table(condition).float()
  return condition.float() @ table.weight.float()


class SparseMoe(nn.Module):
  """Routed experts. Router in fp32: logits = gate(x) (+ s condition_proj(e_task + e_gran), s
  the config's condition_scale, 1 in exports that predate it), softmax over all experts, top-k;
  weights raw (SkyMoE) or renormalised over the k. e_task and e_gran are rows of the tables for
  ids, or their probability-weighted mix for distributions (mix_condition)."""

  def __init__(self, llm, m):
    super().__init__()
    d, e = llm.embed_dim, m.num_experts
    self.top_k, self.renormalize, self.adaptive = m.top_k, m.renormalize, m.adaptive
    self.gate = nn.Linear(d, e, bias=False)
    if m.adaptive:
      self.task_embed = nn.Embedding(m.num_tasks, m.condition_dim)
      self.granularity_embed = nn.Embedding(m.num_granularities, m.condition_dim)
      self.condition_proj = nn.Linear(m.condition_dim, e, bias=False)
      self.condition_scale = float(getattr(m, 'condition_scale', 1.0))
    self.experts = nn.ModuleList(Expert(d, m.mlp_dim or llm.mlp_dim) for _ in range(e))

  def route(self, x, token_mask, task, granularity):
    """(ids [B, T, k], weights [B, T, k] fp32, probs [B, T, E]) for x [B, T, D]; task and
    granularity: ids [B] or distributions [B, N] (unused by a router that is not adaptive)."""
    logits = F.linear(x.float(), self.gate.weight.float())
    if self.adaptive:
      cond = mix_condition(self.task_embed, task) + mix_condition(self.granularity_embed,
                                                                  granularity)
      bias = self.condition_scale * F.linear(cond, self.condition_proj.weight.float())
      logits = logits + bias[:, None, :]
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, self.top_k, dim=-1)
    if self.renormalize:
      weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * token_mask[..., None].float(), probs

  def forward(self, x, token_mask, task, granularity):
    b, t, d = x.shape
    ids, weights, _ = self.route(x, token_mask, task, granularity)
    xs, ids, weights = x.reshape(-1, d), ids.reshape(b * t, -1), weights.reshape(b * t, -1)
    out = torch.zeros_like(xs)
    for e, expert in enumerate(self.experts):
      hit = ids == e
      rows = hit.any(-1).nonzero(as_tuple=True)[0]
      if rows.numel():
        w = (weights * hit).sum(-1)[rows].to(x.dtype)
        out.index_add_(0, rows, expert(xs[rows]) * w[:, None])
    return out.reshape(b, t, d)


class DecoderLayer(nn.Module):
  def __init__(self, cfg, layer_idx: int, is_moe: bool):
    super().__init__()
    llm = cfg.llm
    self.is_moe = is_moe
    self.input_layernorm = RMSNorm(llm.embed_dim, llm.norm_eps)
    self.self_attn = Attention(llm, layer_idx, image_grid(cfg))
    self.post_attention_layernorm = RMSNorm(llm.embed_dim, llm.norm_eps)
    if is_moe:
      self.block_sparse_moe = SparseMoe(llm, cfg.moe)
    else:
      self.mlp = MLP(llm.embed_dim, llm.mlp_dim)

  def forward(self, x, positions, mask, token_mask, task, granularity, cache=None):
    x = x + self.self_attn(self.input_layernorm(x), positions, mask, cache)
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      return x + self.block_sparse_moe(h, token_mask, task, granularity)
    return x + self.mlp(h)


class LlamaModel(nn.Module):
  def __init__(self, cfg, moe_layers: Sequence[int]):
    super().__init__()
    llm = cfg.llm
    moe = set(moe_layers)
    self.embed_tokens = nn.Embedding(llm.vocab_size, llm.embed_dim)
    self.layers = nn.ModuleList(DecoderLayer(cfg, i, i in moe) for i in range(llm.num_layers))
    self.norm = RMSNorm(llm.embed_dim, llm.norm_eps)


class LanguageModel(nn.Module):
  def __init__(self, cfg, moe_layers: Sequence[int]):
    super().__init__()
    self.tied = bool(cfg.llm.tie_embeddings)
    self.model = LlamaModel(cfg, moe_layers)
    if not self.tied:
      self.lm_head = nn.Linear(cfg.llm.embed_dim, cfg.llm.vocab_size, bias=False)

  def head(self):
    return self.model.embed_tokens.weight if self.tied else self.lm_head.weight

  def decode(self, x, slot_mask, task, granularity, cache=None):
    """The decoder on embeddings x [B, T, D] that fill the last T of the S slots of slot_mask
    [B, S] (which slots hold real tokens: the cache's S - T, then the new T), routed by task and
    granularity: ids [B] (the tags) or distributions [B, N] (a predicted condition).

    RoPE positions count the real slots before each one. Returns fp32 logits [B, T, V]; the new
    keys and values are appended to `cache`, which must hold exactly S - T slots.
    """
    t, s = x.shape[1], slot_mask.shape[1]
    index = s - t
    past = cache.get_seq_length() if cache is not None else 0
    if past != index:
      raise ValueError(f'the mask covers {s} slots for {t} new tokens, so {index} earlier ones, '
                       f'but the cache holds {past}')
    slot_mask = slot_mask.bool()
    positions = positions_from_mask(slot_mask)[:, index:]
    causal = torch.arange(s, device=x.device)[None, :] <= (index + torch.arange(
        t, device=x.device))[:, None]
    mask = causal[None] & slot_mask[:, None, :]
    token_mask = slot_mask[:, index:]
    for layer in self.model.layers:
      x = layer(x, positions, mask, token_mask, task, granularity, cache)
    x = self.model.norm(x)
    return F.linear(x.float(), self.head().float())


class ConditionHead(nn.Module):
  """model/skymoe.py's condition head with its pooling (SkyMoE.predict_condition): the mean
  embedding of the masked tokens, scaled to unit RMS (an empty mask pools to zero: the bias
  alone decides), then logit_scale * (pooled @ weight.T + bias) in fp32; the first num_tasks
  logits are the task's, the rest the granularity's. logit_scale and rms_eps are the export's
  (skymoe.condition_head in config.json), the constants the JAX model computed with."""

  def __init__(self, dim: int, num_tasks: int, num_granularities: int, logit_scale: float,
               rms_eps: float):
    super().__init__()
    self.num_tasks, self.logit_scale, self.rms_eps = num_tasks, float(logit_scale), float(rms_eps)
    self.weight = nn.Parameter(torch.zeros(num_tasks + num_granularities, dim))
    self.bias = nn.Parameter(torch.zeros(num_tasks + num_granularities))

  def forward(self, embeds, mask):
    """(task logits [B, num_tasks], granularity logits [B, G]) fp32 of token embeddings
    [B, T, D] pooled where mask [B, T]."""
    weights = mask.float()[..., None]
    pooled = (embeds.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + self.rms_eps)
    logits = self.logit_scale * F.linear(pooled, self.weight.float(), self.bias.float())
    return logits[:, :self.num_tasks], logits[:, self.num_tasks:]


def predict_condition(model: nn.Module, tokens, mask) -> Tuple[torch.Tensor, torch.Tensor]:
  """The predicted condition (task probabilities [B, num_tasks], granularity [B, G], fp32) of
  text tokens [B, T] pooled where mask [B, T] (the prompt's real text tokens); `model` holds the
  parts of `submodules`."""
  embeds = model.language_model.model.embed_tokens(tokens)
  task, granularity = model.condition_head(embeds, mask.bool())
  return torch.softmax(task, dim=-1), torch.softmax(granularity, dim=-1)


def positions_from_mask(mask):
  """Each real token's position among the real tokens of its row (padding repeats its left)."""
  return torch.clamp(torch.cumsum(mask.long(), dim=1) - 1, min=0)


def vision_view(model_config: dict) -> dict:
  """The HF CLIPVisionConfig fields of the exported tower (its blocks up to the feature layer)."""
  v = _namespace(model_config).vision
  feature = v.feature_layer
  blocks = v.depth + 1 + feature if feature < 0 else feature
  return dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=blocks,
              num_attention_heads=v.num_heads, image_size=v.image_size,
              patch_size=v.patch_size, layer_norm_eps=v.norm_eps)


def submodules(model_config: dict, moe_layers: Sequence[int],
               condition_head: Optional[dict] = None) -> Dict[str, nn.Module]:
  """The model's parts, named as the export's tensors: this class and the transformers model of
  modeling_skymoe.py both hold exactly these, so both load the same files. Three, and a fourth,
  the condition head, for a model that predicts its router's condition: `condition_head` is
  then the export's skymoe.condition_head (its logit_scale and rms_eps)."""
  cfg = _namespace(model_config)
  parts = {'vision_tower': VisionTower(_namespace(vision_view(model_config))),
           'multi_modal_projector': Projector(
               cfg.vision.width, cfg.llm.embed_dim, cfg.vision.image_size // cfg.vision.patch_size,
               getattr(cfg.vision, 'token_posemb', 'none')),
           'language_model': LanguageModel(cfg, moe_layers)}
  if predicts_condition(model_config):
    if not isinstance(condition_head, dict):
      raise ValueError("model.moe.condition='predicted' needs the export's skymoe.condition_head "
                       '(logit_scale, rms_eps) to build the condition head')
    m = cfg.moe
    parts['condition_head'] = ConditionHead(cfg.llm.embed_dim, m.num_tasks, m.num_granularities,
                                            condition_head['logit_scale'],
                                            condition_head['rms_eps'])
  return parts


def encode_images(model: nn.Module, images):
  """[B, 3, H, W] -> [B, Nv, D] image tokens in the LLM's embedding space (`model` holds the
  parts of `submodules`)."""
  return model.multi_modal_projector(model.vision_tower(images))


class SkyMoEForConditionalGeneration(nn.Module):
  """The whole model. Build it with `from_pretrained(folder)`, or from a `skymoe` model config,
  the indices of its MoE decoder layers and (a predicted condition) skymoe.condition_head."""

  def __init__(self, model_config: dict, moe_layers: Sequence[int],
               condition_head: Optional[dict] = None):
    super().__init__()
    self.config = _namespace(model_config)
    self.predicted = predicts_condition(model_config)  # the condition head routes, not tags
    for name, module in submodules(model_config, moe_layers, condition_head).items():
      setattr(self, name, module)

  @classmethod
  def from_pretrained(cls, folder, dtype=torch.float32, device='cpu'):
    """The model of an export folder. Tensors are read one at a time and copied into their
    parameters, so the host holds the model plus one tensor, never a second state dict."""
    config, files = export_files(folder)  # config.json checked: a skymoe section, every field
    skymoe = config['skymoe']
    model = cls(skymoe['model'], skymoe['moe_layers'], skymoe.get('condition_head'))
    own = model.state_dict()
    filled, unexpected = set(), []
    with torch.no_grad():
      for path in files:
        for name, tensor in iter_safetensors(path):
          if name not in own:
            unexpected.append(name)
            continue
          if tuple(tensor.shape) != tuple(own[name].shape):
            raise LoadError(f'{path}: tensor {name!r} has shape {list(tensor.shape)}, the '
                            f'config makes it {list(own[name].shape)}')
          own[name].copy_(tensor)
          filled.add(name)
    missing = set(own) - filled
    if missing or unexpected:
      raise LoadError(f'{folder}: tensors missing {sorted(missing)[:5]}, unexpected '
                      f'{sorted(unexpected)[:5]}')
    return model.to(device=device, dtype=dtype).eval()

  def encode_images(self, images):
    """[B, 3, H, W] -> [B, Nv, D] image tokens in the LLM's embedding space."""
    return encode_images(self, images)

  def _prefix(self, images, tokens, token_mask):
    image_embeds = self.encode_images(images)
    b, nv = image_embeds.shape[:2]
    text = self.language_model.model.embed_tokens(tokens).to(image_embeds.dtype)
    x = torch.cat([image_embeds, text], dim=1)
    mask = torch.cat([torch.ones(b, nv, dtype=torch.bool, device=x.device),
                      token_mask.bool()], dim=1)
    return x, mask, nv

  def predict_condition(self, tokens, mask):
    """The condition head's (task probabilities [B, num_tasks], granularity [B, G]) of text
    tokens [B, T] pooled where mask [B, T]."""
    return predict_condition(self, tokens, mask)

  def condition(self, tokens, pooled_mask, task_id=None, granularity_id=None):
    """What routes, (task, granularity): the ids [B] when given; with neither, a model that
    predicts its condition predicts it from `tokens` pooled where `pooled_mask` (distributions
    [B, N]). An adaptive router refuses half of the ids, and no ids unless it predicts; a
    router that is not adaptive reads neither."""
    m = self.config.moe
    given = (task_id is not None, granularity_id is not None)
    if not (m.num_experts and m.adaptive) or all(given):
      return task_id, granularity_id
    if any(given) or not self.predicted:
      raise ValueError('this model\'s adaptive router needs both task_id and granularity_id [B]'
                       + (', or neither (its condition head predicts them)'
                          if self.predicted else ''))
    return self.predict_condition(tokens, pooled_mask)

  def forward(self, images, tokens, token_mask, task_id=None, granularity_id=None,
              prompt_mask=None):
    """Logits [B, T, V] (fp32) at the text positions: logits[:, t] predicts tokens[:, t + 1].

    task_id, granularity_id [B]: the tags that route. Without them a model that predicts its
    condition pools the real tokens where prompt_mask [B, T] (default: all of them, i.e. the
    tokens are a prompt), as the JAX model's forward pass."""
    pooled = token_mask.bool() if prompt_mask is None else prompt_mask.bool() & token_mask.bool()
    task, granularity = self.condition(tokens, pooled, task_id, granularity_id)
    x, mask, nv = self._prefix(images, tokens, token_mask)
    return self.language_model.decode(x, mask, task, granularity)[:, nv:]

  @torch.no_grad()
  def generate(self, images, tokens, token_mask, task_id=None, granularity_id=None,
               max_new_tokens: int = 32, eos_id: int = 2, pad_id: int = 0):
    """Greedy decoding. Returns (tokens [B, max_new_tokens]: each row's tokens up to and
    including eos, then pad_id; lengths [B]: tokens before eos), as the JAX generator. A
    predicted condition comes from the prompt (tokens where token_mask) once, before the
    prefill, and routes every new token."""
    task, granularity = self.condition(tokens, token_mask.bool(), task_id, granularity_id)
    x, mask, _ = self._prefix(images, tokens, token_mask)
    # Right-align every row's real tokens (stable: order kept) so new tokens share one slot.
    order = torch.sort(mask.int(), dim=1, stable=True).indices
    x = torch.gather(x, 1, order[:, :, None].expand_as(x))
    mask = torch.gather(mask, 1, order)
    b = mask.shape[0]
    cache = KVCache()
    logits = self.language_model.decode(x, mask, task, granularity, cache)
    token = logits[:, -1].argmax(-1)
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    lengths = torch.zeros(b, dtype=torch.long, device=x.device)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=x.device)
    for step in range(max_new_tokens):
      if step:
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=x.device)], dim=1)
        emb = self.language_model.model.embed_tokens(out[:, step - 1:step]).to(x.dtype)
        token = self.language_model.decode(emb, mask, task, granularity, cache)[:, 0]
        token = token.argmax(-1)
      token = torch.where(done, torch.full_like(token, pad_id), token)
      done = done | (token == eos_id)
      lengths += (~done).long()
      out[:, step] = token
      if bool(done.all()):
        break
    return out, lengths
