"""Evaluation of a checkpoint: generation on the eval sets, the five task metrics split by
granularity, and routing analytics.

  evaluate(config, workdir, step=None) -> report dict, and DIR/eval/<step>/:
    answers.jsonl   {"question_id", "answer", "task", "granularity", ...} per question
                    (GeoChat-compatible question_id/answer); a rerun skips the ids already there
    metrics.json    evaluators.granularity_report of every task, the template and tokenizer hash
    routing.json    per MoE layer: expert load by task and granularity, router entropy, drops
    routing.png     the same loads as a heatmap per MoE layer

Questions are the last human turn of each eval record; the reference is the record's last
assistant turn (or meta['references']). Questions are batched within one (task, granularity)
cell, so each batch's router entropy is that cell's; routing is measured on the prompt (image
and question tokens) in one forward pass. Generation is greedy unless config.eval says otherwise.
"""
import collections
import json
import logging
import pathlib
from typing import Dict, List, Optional

import jax
import numpy as np

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import records, tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import evaluators, generate as generate_lib, prompts
from skymoe_jax.evaluation import routing as routing_lib
from skymoe_jax.model import factory, layout
from skymoe_jax.parallel import mesh as mesh_lib

DIALECT = 'geochat'  # the box dialect of the answers in our records


def eval_questions(config) -> List[Dict]:
  """One question per record of each source's eval split (at most eval.max_samples each)."""
  questions = []
  for name in sorted(config.data.sources):
    source = config.data.sources[name]
    reader = records.ShardReader(source.data_dir, config.eval.split)
    n = len(reader) if not config.eval.max_samples else min(len(reader), config.eval.max_samples)
    for i in range(n):
      r = reader.record(i)
      questions.append({'question_id': f'{name}/{r.id}', 'record': r})
    reader.close()
  return questions


def _reference_answers(r: records.Record) -> List[str]:
  return list(r.meta.get('references') or [r.conversations[-1]['value']])


def _load_answers(path: pathlib.Path) -> Dict[str, Dict]:
  if not path.exists():
    return {}
  done = {}
  for line in path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      done[row['question_id']] = row
  return done


def evaluate(config, workdir, step: Optional[int] = None, params=None) -> Dict:
  """Evaluates `params` (default: the workdir's checkpoint `step`, or its latest)."""
  workdir = workdir_lib.resolve(workdir)
  model = factory.create_model(config)
  tokenizer = tokenizer_lib.Tokenizer(workdir_lib.tokenizer_path(workdir))
  template = template_lib.get_template(config.data.template)
  mesh = mesh_lib.create_mesh(config)
  if params is None:
    step, params = workdir_lib.restore_params(config, workdir, step, mesh)
  out = workdir_lib.eval_dir(workdir, step)
  out.mkdir(parents=True, exist_ok=True)

  e = config.eval
  generate = generate_lib.make_generate_fn(model, config, e.max_new_tokens, tokenizer.eos_id,
                                           tokenizer.pad_id, e.temperature, e.top_p, mesh)
  prefill = jax.jit(lambda p, *a: model.apply({'params': p}, *a)[1]['moe'])
  answers_path = out / 'answers.jsonl'
  done = _load_answers(answers_path)
  questions = eval_questions(config)
  groups = collections.defaultdict(list)
  for q in questions:
    groups[(q['record'].task, q['record'].granularity)].append(q)
  routing = routing_lib.RoutingStats()
  rng = jax.random.key(config.seed)
  text_len = config.data.text_len
  with open(answers_path, 'a') as answers_file:
    for (task, gran), group in sorted(groups.items()):
      for start in range(0, len(group), e.batch_size):
        chunk = group[start:start + e.batch_size]
        todo = [q for q in chunk if q['question_id'] not in done]
        if not todo:
          continue
        prepared = [prompts.prepare(q['record'].image, q['record'].conversations[:-1], config,
                                    tokenizer, template, name=f'question {q["question_id"]}')
                    for q in todo]
        rows = e.batch_size
        images, tokens, mask = prompts.pad_batch(prepared, rows, text_len)
        task_ids = np.full((rows,), tasks.task_id(task), np.int32)
        gran_ids = np.full((rows,), tasks.granularity_id(gran), np.int32)
        rng, key = jax.random.split(rng)
        with mesh_lib.activate(mesh, config):
          generated, lengths = generate(params, images, tokens, mask, task_ids, gran_ids,
                                        key if e.temperature > 0 else None)
          routing.add(jax.device_get(prefill(params, images[:len(todo)], tokens[:len(todo)],
                                             mask[:len(todo)], task_ids[:len(todo)],
                                             gran_ids[:len(todo)])), task, gran)
        generated, lengths = np.asarray(generated), np.asarray(lengths)
        for i, q in enumerate(todo):
          r = q['record']
          row = {'question_id': q['question_id'],
                 'answer': tokenizer.decode(generated[i, :lengths[i]].tolist()),
                 'task': task, 'granularity': gran,
                 'question_type': r.meta.get('question_type', ''),
                 'references': _reference_answers(r),
                 'width': prepared[i]['width'], 'height': prepared[i]['height']}
          answers_file.write(json.dumps(row) + '\n')
          done[q['question_id']] = row
        answers_file.flush()
  samples = collections.defaultdict(list)
  for row in done.values():
    sample = {'question_id': row['question_id'], 'prediction': row['answer'],
              'references': row['references'], 'granularity': row['granularity']}
    if row['question_type']:
      sample['question_type'] = row['question_type']
    if row['task'] == 'grounding':
      sample.update(width=row['width'], height=row['height'], dialect=DIALECT,
                    pad_to_square=False)
    samples[row['task']].append(sample)
  report = {'step': step, 'template': config.data.template,
            'template_hash': template_lib.template_hash(template),
            'tokenizer_hash': tokenizer.model_hash,
            'tasks': evaluators.granularity_report(dict(samples))}
  (out / 'metrics.json').write_text(json.dumps(report, indent=1) + '\n')
  routing_report = routing.report(layout.moe_layers(config.model))
  if routing_report is not None:
    (out / 'routing.json').write_text(json.dumps(routing_report, indent=1) + '\n')
    routing_lib.plot_routing(routing_report, out / 'routing.png')
  logging.info('evaluation of step %s written to %s', step, out)
  report['dir'] = str(out)
  return report




def table(report: Dict) -> str:
  """A short per-task text table: the headline metric overall and per granularity."""
  lines = [f'{"task":22s} {"metric":10s} {"n":>5s} {"overall":>8s} {"global":>8s} '
           f'{"local":>8s} {"mixed":>8s}']
  for task, result in report['tasks'].items():
    key = evaluators.get_evaluator(task).headline

    def value(m):
      v = m.get(key)
      return f'{v:8.3f}' if isinstance(v, (int, float)) else f'{"-":>8s}'
    by = result.get('by_granularity', {})
    lines.append(f'{task:22s} {key:10s} {result["overall"].get("n", 0):5d} '
                 f'{value(result["overall"])} ' +
                 ' '.join(value(by[g]) if g in by else f'{"-":>8s}'
                          for g in ('global', 'local', 'mixed')))
  return '\n'.join(lines)
