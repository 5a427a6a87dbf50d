"""The classic remote-sensing benchmarks -> records, read from their published file layouts.

Nothing is downloaded: the files are placed by hand in a manual_dir, which is either the dataset's
top folder below (e.g. UCMerced_LandUse) or the folder that contains it:

  ucmerced       UCMerced_LandUse/Images/<class>/<class>NN.tif    21 classes x 100, 256x256 TIFF
  nwpu_resisc45  NWPU-RESISC45/<class>/<class>_NNN.jpg             45 classes x 700, 256x256 JPEG
  rsvqa_lr       LR_split_{train,val,test}_{questions,answers,images}.json and Images_LR/<img_id>.tif
                 (questions: {"questions": [{"id", "img_id", "type", "question", "answers_ids",
                 "active"}]}, answers: {"answers": [{"id", "question_id", "answer", "active"}]},
                 images: {"images": [{"id", "questions_ids", "active"}]})
  dior_rsvg      DIOR_RSVG/Annotations/NNNNN.xml (VOC: <filename>, <size>, <object> with <name>,
                 <bndbox> and <description>), JPEGImages/NNNNN.jpg, {train,val,test}.txt: one
                 integer per line, the index of an <object> counted over all annotation files in
                 file-name order (the RSVG-pytorch loader's convention)
  ucm_captions   dataset.json (Karpathy style: {"images": [{"filename", "imgid", "split",
                 "sentences": [{"raw"}]}]}) and imgs/<filename>

Samples (human turn after `<image>\\n`; the records' task/granularity are set from the task):
  scene classification  "Classify the scene of this image into one of these classes: a, b, ...
                        Answer with the class name." -> the class name, lower-case, '_' -> ' '
                        (UC Merced's run-together names are split into words: 'dense residential')
  VQA (RSVQA-LR)        "{question} Answer the question using a single word or phrase." -> answer;
                        type count -> counting/local, other types -> vqa/mixed
  grounding (DIOR-RSVG) "[refer] {description}" -> the GeoChat box `{<x1><y1><x2><y2>}`; the record
                        keeps the exact pixel box, labelled with the object's class
  captioning (UCM)      "Describe the image in one sentence." -> the first reference caption

Splits: RSVQA-LR, DIOR-RSVG and UCM-Captions have official ones. UC Merced and NWPU-RESISC45 have
none: if `<dataset>-{train,val,test}.txt` lists of file names are in manual_dir (the torchgeo
files uc_merced-*.txt / resisc45-*.txt), they are used; otherwise each class is shuffled with
`seed` and cut 60% train / 20% val / 20% test (STRATIFIED_SPLIT), the ratio of those lists.

Evaluation extras go to Record.meta: RSVQA-LR {"question_type", "question_id", "image_id"} (the
type is also the last part of the record id, `rsvqa_lr/<split>/<question id>/<type>`),
UCM-Captions {"references": [all captions, the answer first]}.

A file of the layout that is missing raises LayoutError naming the expected path and the layout;
a broken sample is skipped and counted (convert/__init__.py), and so is an image of more than
max_image_pixels pixels or an image file name (DIOR-RSVG <filename>, UCM-Captions "filename") that
resolves outside its images folder. A DIOR-RSVG annotation file that does not parse raises too:
its object count is unknown, so every later split index would shift. The splits a conversion
writes replace the old ones only once they are complete (convert.Output).
"""
import functools
import json
import logging
import pathlib
import xml.etree.ElementTree as ET
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data import image_ops
from skymoe_jax.data import records
from skymoe_jax.data import template
from skymoe_jax.data.convert import Output, Skip, Skips, finish, image_path, load_image

log = logging.getLogger(__name__)

IMAGE = template.LLAVA_V1.image_placeholder
SPLITS = ('train', 'val', 'test')
STRATIFIED_SPLIT = (('train', 0.6), ('val', 0.2), ('test', 0.2))
IMAGE_SUFFIXES = ('.tif', '.tiff', '.jpg', '.jpeg', '.png', '.bmp')

UCMERCED_CLASSES = (
    'agricultural', 'airplane', 'baseballdiamond', 'beach', 'buildings', 'chaparral',
    'denseresidential', 'forest', 'freeway', 'golfcourse', 'harbor', 'intersection',
    'mediumresidential', 'mobilehomepark', 'overpass', 'parkinglot', 'river', 'runway',
    'sparseresidential', 'storagetanks', 'tenniscourt')
# UC Merced writes class names run together; the answers use words.
UCMERCED_NAMES = {
    'baseballdiamond': 'baseball diamond', 'denseresidential': 'dense residential',
    'golfcourse': 'golf course', 'mediumresidential': 'medium residential',
    'mobilehomepark': 'mobile home park', 'parkinglot': 'parking lot',
    'sparseresidential': 'sparse residential', 'storagetanks': 'storage tanks',
    'tenniscourt': 'tennis court'}
RESISC45_CLASSES = (
    'airplane', 'airport', 'baseball_diamond', 'basketball_court', 'beach', 'bridge',
    'chaparral', 'church', 'circular_farmland', 'cloud', 'commercial_area', 'dense_residential',
    'desert', 'forest', 'freeway', 'golf_course', 'ground_track_field', 'harbor',
    'industrial_area', 'intersection', 'island', 'lake', 'meadow', 'medium_residential',
    'mobile_home_park', 'mountain', 'overpass', 'palace', 'parking_lot', 'railway',
    'railway_station', 'rectangular_farmland', 'river', 'roundabout', 'runway', 'sea_ice',
    'ship', 'snowberg', 'sparse_residential', 'stadium', 'storage_tank', 'tennis_court',
    'terrace', 'thermal_power_station', 'wetland')
assert len(UCMERCED_CLASSES) == 21 and len(RESISC45_CLASSES) == 45

# As stated where the datasets are distributed; 'unknown' where no licence is stated. Override
# with licence=... when you know better.
LICENCES = {
    'ucmerced': 'public domain (USGS National Map imagery)',
    'nwpu_resisc45': 'CC BY-NC 4.0',
    'rsvqa_lr': 'unknown',
    'dior_rsvg': 'unknown',
    'ucm_captions': 'unknown',
}

RSVQA_TYPES = ('presence', 'comparison', 'rural_urban', 'count')
VQA_SUFFIX = ' Answer the question using a single word or phrase.'
CAPTION_PROMPT = 'Describe the image in one sentence.'


class LayoutError(FileNotFoundError):
  """A file or folder of a benchmark's published layout is not in manual_dir."""


def _layout_error(name: str, expected: pathlib.Path, layout: str) -> LayoutError:
  return LayoutError(f'{name}: expected {expected} (published layout under manual_dir: {layout}); '
                     'place the files by hand, nothing is downloaded')


def _root(manual_dir, folders, marker: str, name: str, layout: str) -> pathlib.Path:
  """The first of manual_dir/<each of folders>, then manual_dir itself, that holds `marker`
  (folders: one name or the spellings a dataset ships under)."""
  manual_dir = pathlib.Path(manual_dir)
  folders = (folders,) if isinstance(folders, str) else tuple(folders)
  for root in [manual_dir / f for f in folders] + [manual_dir]:
    if (root / marker).exists():
      return root
  raise _layout_error(name, manual_dir / folders[0] / marker, layout)


def _cached_loader(max_pixels: int):
  # Several samples share an image (RSVQA: ~100 questions each; DIOR-RSVG: a few objects each).
  return functools.lru_cache(maxsize=64)(functools.partial(load_image, max_pixels=max_pixels))


# One sample: (split, input file, record name for the log, make() -> record).
_Sample = Tuple[str, object, str, Callable[[], records.Record]]


def _run(samples: Iterable[_Sample], out: Output, skips: Skips) -> None:
  """Writes each sample; a Skip from its `make` is counted and logged instead."""
  for split, file, where, make in samples:
    try:
      record = make()
    except Skip as skip:
      skips.add(skip, file, where, split)
      continue
    out.write(split, record)


# ------------------------------------------------------------------------ scene classification

def class_answer(name: str) -> str:
  return UCMERCED_NAMES.get(name.lower(), name.lower().replace('_', ' '))


def classification_prompt(classes: Sequence[str]) -> str:
  names = ', '.join(sorted(class_answer(c) for c in classes))
  return (f'{IMAGE}\nClassify the scene of this image into one of these classes: {names}. '
          'Answer with the class name.')


def stratified_split(files_by_class: Dict[str, List[pathlib.Path]], seed: int,
                     fractions=STRATIFIED_SPLIT) -> Dict[pathlib.Path, str]:
  """{file: split}: each class shuffled with one seeded generator (classes in sorted order) and
  cut by `fractions`; the first split takes the rounding remainder."""
  rng = np.random.default_rng(seed)
  out = {}
  for cls in sorted(files_by_class):
    files = sorted(files_by_class[cls])
    order = rng.permutation(len(files))
    sizes = [int(round(f * len(files))) for _, f in fractions[1:]]
    sizes.insert(0, len(files) - sum(sizes))
    start = 0
    for (split, _), size in zip(fractions, sizes):
      for i in order[start:start + size]:
        out[files[i]] = split
      start += size
  return out


def _list_splits(manual_dir: pathlib.Path, prefix: str) -> Optional[Dict[str, str]]:
  """{file name: split} from `<prefix>-{train,val,test}.txt` in manual_dir, or None."""
  paths = {s: manual_dir / f'{prefix}-{s}.txt' for s in SPLITS}
  if not any(p.exists() for p in paths.values()):
    return None
  out = {}
  for split, path in paths.items():
    if path.exists():
      for line in path.read_text().split():
        out[line.strip()] = split
        out.setdefault(pathlib.Path(line.strip()).stem, split)  # lists without extensions too
  return out


def _convert_classification(name: str, image_root: pathlib.Path, manual_dir: pathlib.Path,
                            classes: Sequence[str], list_prefix: str, out_dir, seed: int,
                            licence: str, records_per_shard: int,
                            max_image_pixels: int) -> Dict:
  skips = Skips()
  files_by_class: Dict[str, List[pathlib.Path]] = {}
  for folder in sorted(p for p in image_root.iterdir() if p.is_dir()):
    files = []
    for path in sorted(folder.iterdir()):
      if path.suffix.lower() in IMAGE_SUFFIXES:
        files.append(path)
      else:  # e.g. Thumbs.db: counted so that nothing in a class folder vanishes unseen
        skips.add(Skip('not_an_image_file', 'file name', path.suffix), path, path.name)
    if files:
      files_by_class[folder.name] = files
  if not files_by_class:
    raise _layout_error(name, image_root / '<class>', f'{image_root}/<class>/<image>')
  found = set(files_by_class)
  if found != set(classes):
    log.warning('%s: class folders differ from the published %d: missing %s, extra %s', name,
                len(classes), sorted(set(classes) - found), sorted(found - set(classes)))
  listed = _list_splits(manual_dir, list_prefix)
  split_of = (None if listed is not None else stratified_split(files_by_class, seed))
  # The prompt lists the benchmark's vocabulary, whatever subset of it is on disk.
  prompt = classification_prompt(sorted(set(classes) | found))
  out = Output(out_dir, records_per_shard)

  def samples():
    for cls, files in sorted(files_by_class.items()):
      for path in files:
        if listed is not None:
          split = listed.get(path.name, listed.get(path.stem))
          if split is None:
            skips.add(Skip('not_in_split_lists', 'file name',
                           f'{path.name} is in none of {list_prefix}-*.txt'), path, path.name)
            continue
        else:
          split = split_of[path]

        def make(path=path, cls=cls):
          image = load_image(path, max_pixels=max_image_pixels)
          return records.Record(
              id=f'{name}/{cls}/{path.stem}', image=image.data,
              conversations=[{'from': 'human', 'value': prompt},
                             {'from': 'gpt', 'value': class_answer(cls)}],
              task='scene_classification', granularity='global', source=name,
              licence=licence)
        yield split, path, path.name, make

  with out:
    _run(samples(), out, skips)
    return finish(out, name=name, licence=licence, skips=skips, classes=sorted(files_by_class),
                  split_rule=(f'lists {list_prefix}-*.txt' if listed is not None else
                              f'stratified {dict(STRATIFIED_SPLIT)} seed {seed}'))


def convert_ucmerced(manual_dir, out_dir, seed: int = 0, licence: Optional[str] = None,
                     records_per_shard: int = 1000,
                     max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> Dict:
  layout = 'UCMerced_LandUse/Images/<class>/<class>NN.tif'
  manual_dir = pathlib.Path(manual_dir)
  root = _root(manual_dir, 'UCMerced_LandUse', 'Images', 'ucmerced', layout)
  return _convert_classification('ucmerced', root / 'Images', manual_dir, UCMERCED_CLASSES,
                                 'uc_merced', out_dir, seed, licence or LICENCES['ucmerced'],
                                 records_per_shard, max_image_pixels)


def convert_nwpu_resisc45(manual_dir, out_dir, seed: int = 0, licence: Optional[str] = None,
                          records_per_shard: int = 1000,
                          max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> Dict:
  layout = 'NWPU-RESISC45/<class>/<class>_NNN.jpg'
  manual_dir = pathlib.Path(manual_dir)
  # The class folders sit directly in the root: look for a published class name as the marker.
  root = None
  for candidate in (manual_dir / 'NWPU-RESISC45', manual_dir):
    if candidate.is_dir() and any((candidate / c).is_dir() for c in RESISC45_CLASSES):
      root = candidate
      break
  if root is None:
    raise _layout_error('nwpu_resisc45', manual_dir / 'NWPU-RESISC45' / '<class>', layout)
  return _convert_classification('nwpu_resisc45', root, manual_dir, RESISC45_CLASSES, 'resisc45',
                                 out_dir, seed, licence or LICENCES['nwpu_resisc45'],
                                 records_per_shard, max_image_pixels)


# ------------------------------------------------------------------------------------ RSVQA-LR

def _json_list(path: pathlib.Path, key: str) -> List:
  data = json.loads(path.read_text(encoding='utf-8'))
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise ValueError(f'{path}: expected {{"{key}": [...]}}')
  return data[key]


def _need(obj: Dict, key: str, types):
  value = obj.get(key) if isinstance(obj, dict) else None
  if value is None or isinstance(value, bool) or not isinstance(value, types):
    raise Skip('missing_field', key, 'absent' if value is None else type(value).__name__)
  return value


def convert_rsvqa_lr(manual_dir, out_dir, seed: int = 0, licence: Optional[str] = None,
                     records_per_shard: int = 1000,
                     max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> Dict:
  del seed  # official splits
  name, licence = 'rsvqa_lr', licence or LICENCES['rsvqa_lr']
  layout = ('LR_split_{train,val,test}_{questions,answers,images}.json + Images_LR/<img_id>.tif')
  root = _root(manual_dir, 'RSVQA_LR', 'Images_LR', name, layout)
  files = {s: {k: root / f'LR_split_{s}_{k}.json' for k in ('questions', 'answers', 'images')}
           for s in SPLITS}
  present = [s for s in SPLITS if any(p.exists() for p in files[s].values())]
  if not present:
    raise _layout_error(name, files['train']['questions'], layout)
  for s in present:
    for path in files[s].values():
      if not path.exists():
        raise _layout_error(name, path, layout)
  skips = Skips()
  out = Output(out_dir, records_per_shard)
  loader = _cached_loader(max_image_pixels)

  def samples():
    for split in present:
      questions = _json_list(files[split]['questions'], 'questions')
      answers = {a.get('id'): a for a in _json_list(files[split]['answers'], 'answers')
                 if isinstance(a, dict)}
      images = {i.get('id'): i for i in _json_list(files[split]['images'], 'images')
                if isinstance(i, dict)}
      for n, q in enumerate(questions):
        if isinstance(q, dict) and q.get('active') is False:
          skips.count('inactive_question', split=split)  # excluded by the dataset itself
          continue

        def make(q=q, split=split):
          qid = _need(q, 'id', int)
          img_id = _need(q, 'img_id', int)
          qtype = _need(q, 'type', str)
          question = _need(q, 'question', str).strip()
          answer_ids = _need(q, 'answers_ids', list)
          image_entry = images.get(img_id)
          if image_entry is None or image_entry.get('active') is False:
            raise Skip('missing_image', 'img_id', f'image {img_id} not active in the images list')
          found = [answers[a] for a in answer_ids
                   if a in answers and answers[a].get('active') is not False]
          if not found or not isinstance(found[0].get('answer'), str):
            raise Skip('missing_answer', 'answers_ids', f'{answer_ids} not in the answers file')
          image = loader(root / 'Images_LR' / f'{img_id}.tif')
          task, granularity = ('counting', 'local') if qtype == 'count' else ('vqa', 'mixed')
          return records.Record(
              id=f'{name}/{split}/{qid}/{qtype}', image=image.data,
              conversations=[{'from': 'human', 'value': f'{IMAGE}\n{question}{VQA_SUFFIX}'},
                             {'from': 'gpt', 'value': found[0]['answer'].strip()}],
              task=task, granularity=granularity, source=name, licence=licence,
              meta=dict(question_type=qtype, question_id=qid, image_id=img_id))
        qid = q.get('id') if isinstance(q, dict) else None
        yield split, files[split]['questions'], f'question {qid!r} (index {n})', make

  with out:
    _run(samples(), out, skips)
    return finish(out, name=name, licence=licence, skips=skips)


# ----------------------------------------------------------------------------------- DIOR-RSVG

def _sort_key(path: pathlib.Path):
  return (0, int(path.stem), '') if path.stem.isdigit() else (1, 0, path.stem)


def _text(element, path: str) -> Optional[str]:
  found = element.find(path)
  return None if found is None or found.text is None else found.text.strip()


def dior_objects(annotations: pathlib.Path) -> List[Tuple[pathlib.Path, ET.Element, ET.Element]]:
  """(xml file, its root, object element) of every <object>, in split-index order."""
  out = []
  for path in sorted(annotations.glob('*.xml'), key=_sort_key):
    try:
      root = ET.parse(path).getroot()
    except ET.ParseError as e:
      raise ValueError(f'{path}: annotation does not parse ({e}); its objects cannot be counted, '
                       'so the split indices after it would be wrong') from None
    out.extend((path, root, obj) for obj in root.findall('object'))
  return out


def convert_dior_rsvg(manual_dir, out_dir, seed: int = 0, licence: Optional[str] = None,
                      records_per_shard: int = 1000,
                      max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> Dict:
  del seed  # official splits
  name, licence = 'dior_rsvg', licence or LICENCES['dior_rsvg']
  layout = 'DIOR_RSVG/{Annotations/*.xml, JPEGImages/*.jpg, train.txt, val.txt, test.txt}'
  root = _root(manual_dir, ('DIOR_RSVG', 'DIOR-RSVG'), 'Annotations', name, layout)
  if not (root / 'JPEGImages').is_dir():
    raise _layout_error(name, root / 'JPEGImages', layout)
  split_files = {s: root / f'{s}.txt' for s in SPLITS if (root / f'{s}.txt').exists()}
  if not split_files:
    raise _layout_error(name, root / 'train.txt', layout)
  split_of: Dict[int, str] = {}
  for split, path in split_files.items():
    for n, line in enumerate(path.read_text().split('\n'), 1):
      if line.strip():
        if not line.strip().isdigit():
          raise ValueError(f'{path} line {n}: {line.strip()!r} is not an object index')
        split_of[int(line)] = split
  objects = dior_objects(root / 'Annotations')
  skips = Skips()
  for index in sorted(set(split_of) - set(range(len(objects)))):
    skips.add(Skip('index_not_found', 'index', f'only {len(objects)} objects'),
              split_files[split_of[index]], f'index {index}', split_of[index])
  skips.count('not_in_split', len(set(range(len(objects))) - set(split_of)))
  out = Output(out_dir, records_per_shard)
  loader = _cached_loader(max_image_pixels)

  def samples():
    for index, (path, xml_root, obj) in enumerate(objects):
      split = split_of.get(index)
      if split is None:
        continue

      def make(index=index, xml_root=xml_root, obj=obj, path=path, split=split):
        cls = _text(obj, 'name')
        description = _text(obj, 'description')
        if not cls:
          raise Skip('missing_field', 'name')
        if not description:
          raise Skip('missing_field', 'description')
        try:
          box = [float(_text(obj, f'bndbox/{k}')) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
        except (TypeError, ValueError):
          raise Skip('missing_field', 'bndbox', 'absent or not numbers') from None
        filename = _text(xml_root, 'filename') or path.stem + '.jpg'
        image = loader(image_path(root / 'JPEGImages', filename))
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
          raise Skip('bad_box', 'bndbox', f'{box} in a {image.width}x{image.height} image')
        answer = boxes_lib.format('geochat', boxes_lib.Box(*box), image.width, image.height)
        return records.Record(
            id=f'{name}/{split}/{index}', image=image.data,
            conversations=[{'from': 'human', 'value': f'{IMAGE}\n[refer] {description}'},
                           {'from': 'gpt', 'value': answer}],
            task='grounding', granularity='local', boxes=[box], labels=[cls], source=name,
            licence=licence)
      yield split, path, f'object {index}', make

  with out:
    _run(samples(), out, skips)
    return finish(out, name=name, licence=licence, skips=skips)


# -------------------------------------------------------------------------------- UCM-Captions

def convert_ucm_captions(manual_dir, out_dir, seed: int = 0, licence: Optional[str] = None,
                         records_per_shard: int = 1000,
                         max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> Dict:
  del seed  # official splits
  name, licence = 'ucm_captions', licence or LICENCES['ucm_captions']
  layout = 'dataset.json (Karpathy style) + imgs/<filename>'
  root = _root(manual_dir, ('UCM_captions', 'UCM-Captions', 'UCM_Captions'), 'dataset.json',
               name, layout)
  if not (root / 'imgs').is_dir():
    raise _layout_error(name, root / 'imgs', layout)
  entries = _json_list(root / 'dataset.json', 'images')
  skips = Skips()
  out = Output(out_dir, records_per_shard)

  def samples():
    for n, entry in enumerate(entries):
      split = entry.get('split') if isinstance(entry, dict) else None
      where = f'image {n} ({entry.get("filename") if isinstance(entry, dict) else entry!r})'
      if split not in SPLITS:
        skips.add(Skip('unknown_split', 'split', repr(split)), root / 'dataset.json', where)
        continue

      def make(entry=entry, split=split):
        filename = _need(entry, 'filename', str)
        sentences = _need(entry, 'sentences', list)
        captions = [s.get('raw', '').strip() for s in sentences if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not captions:
          raise Skip('missing_field', 'sentences', 'no caption with a "raw" text')
        image = load_image(image_path(root / 'imgs', filename), max_pixels=max_image_pixels)
        key = entry.get('imgid', pathlib.Path(filename).stem)
        return records.Record(
            id=f'{name}/{split}/{key}', image=image.data,
            conversations=[{'from': 'human', 'value': f'{IMAGE}\n{CAPTION_PROMPT}'},
                           {'from': 'gpt', 'value': captions[0]}],
            task='captioning', granularity='global', source=name, licence=licence,
            meta=dict(references=captions))
      yield split, root / 'dataset.json', where, make

  with out:
    _run(samples(), out, skips)
    return finish(out, name=name, licence=licence, skips=skips)


CONVERTERS: Dict[str, Callable[..., Dict]] = {
    'ucmerced': convert_ucmerced,
    'nwpu_resisc45': convert_nwpu_resisc45,
    'rsvqa_lr': convert_rsvqa_lr,
    'dior_rsvg': convert_dior_rsvg,
    'ucm_captions': convert_ucm_captions,
}


def convert(name: str, manual_dir, out_dir, seed: int = 0, **kwargs) -> Dict:
  """CONVERTERS[name](manual_dir, out_dir, seed, ...): the summary of the conversion."""
  try:
    fn = CONVERTERS[name]
  except KeyError:
    raise KeyError(f'unknown benchmark {name!r}; known: {sorted(CONVERTERS)}') from None
  return fn(manual_dir, out_dir, seed=seed, **kwargs)
