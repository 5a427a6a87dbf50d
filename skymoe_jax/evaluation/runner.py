"""Evaluation of a checkpoint: generation on the eval sets, the five task metrics split by
granularity, and routing analytics.

  evaluate(config, workdir, step=None) -> report dict, and DIR/eval/<step>/:
    answers.jsonl   {"question_id", "answer", "task", "granularity", ...} per question
                    (GeoChat-compatible question_id/answer); a rerun skips the ids already there
    settings.json   the settings those answers were generated with (answer_settings) and their hash
    metrics.json    evaluators.granularity_report of every task, the settings, template and
                    tokenizer hash
    routing.json    per MoE layer: expert load by task and granularity, router entropy, drops,
                    always over every question (a resumed run measures the answered ones again)
    routing.png     the same loads as a heatmap per MoE layer

Answers are reused only under the settings that made them. A rerun with other settings (say
eval.max_new_tokens) moves the earlier files into DIR/eval/<step>/settings-<hash>/, with a
warning, and answers afresh; a rerun with those settings again moves them back and reuses them.
Nothing is mixed and nothing is lost. A last line cut by a kill mid-write is dropped with a
warning (its question is answered again); any other unreadable line is an error naming it.

Questions are the last human turn of each eval record; the reference is the record's last
assistant turn (or meta['references']). Questions are batched within one (task, granularity)
cell, so each batch's router entropy is that cell's; routing is measured on the prompt (image
and question tokens) in one forward pass. Generation is greedy unless config.eval says otherwise.

What routes. With model.moe.condition='tags' each question is routed by its record's tags
(eval.tags='given') or by tasks.classify's keyword guess from its text, the tag stripped
(eval.tags='stripped': what an untagged question gets; rows record it as routed_task /
routed_granularity). With model.moe.condition='predicted' the model's condition head predicts
it from the prompt and no tag reaches the routing at all (rows record the head's guess as
predicted_task / predicted_granularity). Either way metrics and routing.json are grouped by the
records' true tags, which only key the statistics; batches stay within one true (task,
granularity) cell, since the routing condition is per row. metrics.json says which condition
and tags mode made the answers and how often the guess matched the tags (condition_head /
stripped_tags: task and granularity accuracy, overall and per task).
"""
import collections
import hashlib
import json
import logging
import os
import pathlib
from typing import Dict, List, Optional

import jax
import numpy as np

from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import records, tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import evaluators, generate as generate_lib, prompts
from skymoe_jax.evaluation import routing as routing_lib
from skymoe_jax.model import factory, layout, skymoe
from skymoe_jax.parallel import mesh as mesh_lib

DIALECT = 'geochat'  # the box dialect of the answers in our records
ANSWERS_FILE = 'answers.jsonl'
SETTINGS_FILE = 'settings.json'
# The files of one evaluation under one settings record, moved aside together; settings.json
# last, so that a kill while moving never leaves answers beside another record's settings.
EVALUATION_FILES = (ANSWERS_FILE, 'metrics.json', 'routing.json', 'routing.png', SETTINGS_FILE)
UNKNOWN_SETTINGS = 'unknown'  # answers.jsonl written before settings.json existed


def eval_questions(config) -> List[Dict]:
  """One question per record of each source's eval split: its first eval.max_samples records
  (0 = all), of which the first eval.max_per_task of each task (0 = all), in split order."""
  per_task = config.eval.get('max_per_task', 0)
  questions = []
  for name in sorted(config.data.sources):
    source = config.data.sources[name]
    reader = records.open_split(source.data_dir, config.eval.split)
    n = len(reader) if not config.eval.max_samples else min(len(reader), config.eval.max_samples)
    taken = collections.Counter()
    for i in range(n):
      r = reader.record(i)
      if per_task and taken[r.task] >= per_task:
        continue
      taken[r.task] += 1
      questions.append({'question_id': f'{name}/{r.id}', 'record': r})
    reader.close()
  return questions


def stripped_tags(r: records.Record):
  """(task_id, granularity_id) that tasks.classify guesses from the record's question with its
  tag stripped: the routing of the same question asked untagged (eval.tags='stripped')."""
  human = [t['value'] for t in r.conversations[:-1] if t.get('from') == 'human']
  if not human:
    raise ValueError(f'record {r.id!r}: field conversations: no human turn before the answer')
  task_id, granularity_id, _ = tasks.classify(tasks.strip_tag(human[-1]))
  return task_id, granularity_id


def _rows_of(values, rows: int):
  """[rows] int32 of the per-question values, the spare rows repeating the last (pad_batch)."""
  return np.asarray([values[min(i, len(values) - 1)] for i in range(rows)], np.int32)


def guess_report(rows: List[Dict], prefix: str) -> Dict:
  """How often the answer rows' guessed condition (`prefix`task, `prefix`granularity) matches
  their true tags: {'n', 'task_accuracy', 'granularity_accuracy', 'by_task': {task: ...}}."""
  def summary(group):
    n = len(group)
    return {'n': n,
            'task_accuracy': sum(r[prefix + 'task'] == r['task'] for r in group) / max(n, 1),
            'granularity_accuracy': sum(r[prefix + 'granularity'] == r['granularity']
                                        for r in group) / max(n, 1)}
  rows = [r for r in rows if prefix + 'task' in r]
  by_task = collections.defaultdict(list)
  for r in rows:
    by_task[r['task']].append(r)
  return dict(summary(rows), by_task={t: summary(g) for t, g in sorted(by_task.items())})


def _reference_answers(r: records.Record) -> List[str]:
  return list(r.meta.get('references') or [r.conversations[-1]['value']])


def load_answers(path: pathlib.Path) -> Dict[str, Dict]:
  """question_id -> row of answers file `path` ({} if there is none).

  A last line without its newline is what a kill mid-write leaves: if it does not parse it is
  dropped with a warning and cut from the file (its question is answered again), else its
  newline is added, so that the next row appended starts on a line of its own. Any other line
  that is not a JSON row with a question_id is a ValueError naming the file and line.
  """
  path = storage.path(path)
  if not path.exists():
    return {}
  data = path.read_bytes()
  lines = data.split(b'\n')
  complete, last = lines[:-1], lines[-1]  # last: the bytes after the final newline
  done = {}
  for number, line in enumerate(complete, 1):
    if line.strip():
      row = _parse_row(line, path, number)
      done[row['question_id']] = row
  if last.strip():
    number = len(complete) + 1
    try:
      row = _parse_row(last, path, number)
    except ValueError as e:
      logging.warning('%s: line %d is cut short (a run stopped while writing it); dropping it '
                      'and answering its question again (%s)', path, number, e)
      if storage.is_remote(path):
        path.write_bytes(data[:len(data) - len(last)])  # an object is rewritten, not cut
      else:
        with open(path, 'r+b') as f:
          f.truncate(len(data) - len(last))
    else:
      done[row['question_id']] = row
      storage.append_text(path, '\n')
  return done


class _AnswerLog:
  """answers.jsonl opened for adding rows, each batch's rows on disk before the next batch:
  locally appended and flushed (as ever); in a bucket, where an object cannot grow, the file is
  written again whole at each flush (one object write per batch of answers)."""

  def __init__(self, path):
    self.path = storage.path(path)
    self._remote = storage.is_remote(self.path)
    if self._remote:
      self._text = self.path.read_text() if self.path.exists() else ''
      self._dirty = False
    else:
      self._file = open(self.path, 'a')

  def write(self, text: str) -> None:
    if self._remote:
      self._text += text
      self._dirty = True
    else:
      self._file.write(text)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      self.path.write_text(self._text)
      self._dirty = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.flush()
    if not self._remote:
      self._file.close()


def _parse_row(line: bytes, path: pathlib.Path, number: int) -> Dict:
  try:
    row = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
    raise ValueError(f'{path}: line {number}: not a JSON answer row ({e})') from None
  if not isinstance(row, dict) or 'question_id' not in row:
    raise ValueError(f'{path}: line {number}: an answer row needs a question_id')
  return row


def answer_settings(config, template, tokenizer_hash: str) -> Dict:
  """Everything an answer depends on but the checkpoint (one eval/<step>/ per step) and the
  question: the generation settings, the prompt's template and tokenizer, the image's framing,
  the eval split (question ids are only unique within one) and the model config (its backend,
  dtype or capacity change answers). eval.batch_size is left out on purpose: the rows of a
  batch are independent and greedy answers do not depend on the batch size
  (tests/test_generate.py's batch-invariance test), so answers made in batches of 4 are reused
  for batches of 8. eval.max_samples (and eval.max_per_task) is left out too: it picks
  questions, not their answers. eval.tags enters only when it is not the default, and model.moe.condition only when it is not
  'tags', so the settings (and their hash) of runs from before these options stay the same.
  """
  e = config.eval
  model = config.model.to_dict()
  if model['moe'].get('condition', 'tags') == 'tags':
    model['moe'].pop('condition', None)
  settings = {
      'max_new_tokens': int(e.max_new_tokens), 'temperature': float(e.temperature),
      'top_p': float(e.top_p), 'template': config.data.template,
      'template_hash': template_lib.template_hash(template), 'tokenizer_hash': tokenizer_hash,
      'pad_to_square': bool(config.data.pad_to_square), 'split': e.split,
      'model_hash': _json_hash(model),
  }
  if e.get('tags', 'given') != 'given':
    settings['tags'] = e.tags
  return settings


def settings_hash(settings: Dict) -> str:
  """First 12 hex digits of the sha256 of the settings record as canonical JSON."""
  return _json_hash(settings)


def _json_hash(value) -> str:
  canonical = json.dumps(value, sort_keys=True, separators=(',', ':'), default=str)
  return hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:12]


def use_settings(out: pathlib.Path, settings: Dict) -> None:
  """Makes out/ hold the evaluation files of `settings`: those of other settings are moved into
  out/settings-<their hash>/, and those of `settings`, if an earlier run moved them there, are
  moved back. Then out/settings.json records `settings`."""
  key = settings_hash(settings)
  record = out / SETTINGS_FILE
  current = None
  if record.exists():
    try:
      current = json.loads(record.read_text())['hash']
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{record}: not a settings record ({type(e).__name__}: {e}); it says '
                       f'which settings made {ANSWERS_FILE} there: fix or remove it') from None
  elif (out / ANSWERS_FILE).exists():
    current = UNKNOWN_SETTINGS
  if current == key:
    return
  if current is not None and (out / ANSWERS_FILE).exists():
    aside = out / f'settings-{current}'
    _move(out, aside)
    logging.warning('%s: the answers there were generated with other settings (hash %s); moved '
                    'to %s, answering again with settings %s (hash %s)', out, current, aside,
                    json.dumps(settings, sort_keys=True), key)
  elif current is not None:  # a run that stopped before its first answer: nothing to keep
    for name in EVALUATION_FILES:
      (out / name).unlink(missing_ok=True)
  earlier = out / f'settings-{key}'
  if earlier.is_dir():
    _move(earlier, out)
    earlier.rmdir()
    logging.info('%s: reusing the answers of settings %s from %s', out, key, earlier)
  if not record.exists():
    workdir_lib.write_atomically(
        record, json.dumps({'hash': key, 'settings': settings}, indent=1) + '\n')


def _move(source: pathlib.Path, target: pathlib.Path) -> None:
  target.mkdir(parents=True, exist_ok=True)
  for name in EVALUATION_FILES:
    if (source / name).exists():
      if (target / name).exists():
        raise FileExistsError(f'{target / name} exists: not moving {source / name} over it; '
                              'move one of them away')
      if storage.is_remote(target):
        (source / name).rename(target / name)  # a copy and a delete in a bucket
      else:
        os.replace(source / name, target / name)


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
  settings = answer_settings(config, template, tokenizer.model_hash)
  use_settings(out, settings)
  generate = generate_lib.make_generate_fn(model, config, e.max_new_tokens, tokenizer.eos_id,
                                           tokenizer.pad_id, e.temperature, e.top_p, mesh)
  prefill = routing_lib.router_outputs_fn(model)
  predicted = skymoe.predicts_condition(config.model)
  stripped = e.get('tags', 'given') == 'stripped' and not predicted
  if predicted:
    predict = jax.jit(lambda params, tokens, mask: model.apply(
        {'params': params}, tokens, mask, method='predict_condition'))
  answers_path = out / ANSWERS_FILE
  done = load_answers(answers_path)
  questions = eval_questions(config)
  groups = collections.defaultdict(list)
  for q in questions:
    groups[(q['record'].task, q['record'].granularity)].append(q)
  # routing.json is written only over every question: when any is still to answer (or the
  # report is missing), the answered ones are measured again (one forward pass per batch).
  measure = (any(q['question_id'] not in done for q in questions)
             or not (out / 'routing.json').exists())
  routing = routing_lib.RoutingStats()
  rng = jax.random.key(config.seed)
  text_len = config.data.text_len
  with _AnswerLog(answers_path) as answers_file:
    for (task, gran), group in sorted(groups.items()):
      for start in range(0, len(group), e.batch_size):
        chunk = group[start:start + e.batch_size]
        todo = [q for q in chunk if q['question_id'] not in done]
        if not todo and not measure:
          continue
        asked = chunk if measure else todo
        prepared = [prompts.prepare(q['record'].image, q['record'].conversations[:-1], config,
                                    tokenizer, template, name=f'question {q["question_id"]}')
                    for q in asked]
        rows = e.batch_size
        # The true tags key the routing statistics; they also route unless stripped (then the
        # keyword guess routes) or predicted (then the model's head does, ignoring them).
        task_ids = np.full((rows,), tasks.task_id(task), np.int32)
        gran_ids = np.full((rows,), tasks.granularity_id(gran), np.int32)
        guesses = {q['question_id']: stripped_tags(q['record']) for q in asked} if stripped else {}
        if measure:
          images, tokens, mask = prompts.pad_batch(prepared, rows, text_len)
          n = len(asked)
          condition = None
          if stripped:
            condition = tuple(np.asarray([guesses[q['question_id']][k] for q in asked], np.int32)
                              for k in (0, 1))
          with mesh_lib.activate(mesh, config):
            routing.add(jax.device_get(prefill(params, images[:n], tokens[:n], mask[:n],
                                               task_ids[:n], gran_ids[:n],
                                               condition=condition)), task, gran)
        if not todo:
          continue
        todo_prepared = [p for q, p in zip(asked, prepared) if q['question_id'] not in done]
        images, tokens, mask = prompts.pad_batch(todo_prepared, rows, text_len)
        route_task, route_gran = task_ids, gran_ids
        if stripped:
          route_task = _rows_of([guesses[q['question_id']][0] for q in todo], rows)
          route_gran = _rows_of([guesses[q['question_id']][1] for q in todo], rows)
        rng, key = jax.random.split(rng)
        with mesh_lib.activate(mesh, config):
          generated, lengths = generate(params, images, tokens, mask, route_task, route_gran,
                                        key if e.temperature > 0 else None)
          head = jax.device_get(predict(params, tokens, mask)) if predicted else None
        generated, lengths = np.asarray(generated), np.asarray(lengths)
        for i, q in enumerate(todo):
          r = q['record']
          row = {'question_id': q['question_id'],
                 'answer': tokenizer.decode(generated[i, :lengths[i]].tolist()),
                 'task': task, 'granularity': gran,
                 'question_type': r.meta.get('question_type', ''),
                 'references': _reference_answers(r),
                 'width': todo_prepared[i]['width'], 'height': todo_prepared[i]['height']}
          if stripped:
            row.update(routed_task=tasks.TASKS[int(route_task[i])],
                       routed_granularity=tasks.GRANULARITIES[int(route_gran[i])])
          if predicted:
            row.update(predicted_task=tasks.TASKS[int(np.argmax(head['task'][i]))],
                       predicted_granularity=tasks.GRANULARITIES[
                           int(np.argmax(head['granularity'][i]))])
          answers_file.write(json.dumps(row) + '\n')
          done[q['question_id']] = row
        answers_file.flush()
  samples = collections.defaultdict(list)
  # The questions asked now, not every row of the file: rows of questions no longer asked (a
  # smaller eval.max_samples) stay in answers.jsonl but are not scored.
  for row in (done[q['question_id']] for q in questions):
    sample = {'question_id': row['question_id'], 'prediction': row['answer'],
              'references': row['references'], 'granularity': row['granularity']}
    if row['question_type']:
      sample['question_type'] = row['question_type']
    if row['task'] == 'grounding':
      sample.update(width=row['width'], height=row['height'], dialect=DIALECT,
                    pad_to_square=False)
    samples[row['task']].append(sample)
  report = {'step': step, 'settings': settings, 'settings_hash': settings_hash(settings),
            'template': config.data.template,
            'template_hash': template_lib.template_hash(template),
            'tokenizer_hash': tokenizer.model_hash,
            'tasks': evaluators.granularity_report(dict(samples)),
            'condition': config.model.moe.get('condition', 'tags'),
            'tags': e.get('tags', 'given')}  # under 'predicted' no tag routes, whatever it says
  for task, task_samples in samples.items():
    baseline = evaluators.constant_baseline(task, task_samples)
    if baseline is not None:
      report['tasks'][task]['baseline'] = baseline   # the best constant answer's headline score
  asked_rows = [done[q['question_id']] for q in questions]
  if predicted:
    report['condition_head'] = guess_report(asked_rows, 'predicted_')
  if stripped:
    report['stripped_tags'] = guess_report(asked_rows, 'routed_')
  workdir_lib.write_atomically(out / 'metrics.json', json.dumps(report, indent=1) + '\n')
  routing_report = routing.report(layout.moe_layers(config.model))
  if routing_report is not None:
    # The heatmap first: routing.json, written whole or not at all, says both are complete.
    routing_lib.plot_routing(routing_report, out / 'routing.png')
    workdir_lib.write_atomically(out / 'routing.json', json.dumps(routing_report, indent=1) + '\n')
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
