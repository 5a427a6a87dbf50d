"""The remote-sensing evaluation sources, read from their published file layouts (SOURCES).

Each entry of SOURCES is a convert.SourceSpec whose `samples` reads one dataset from a manual_dir
(nothing is downloaded; data/builders.py turns each into the tfds builder skymoe_<name>). The
manual_dir is the dataset's top folder below (e.g. UCMerced_LandUse) or the folder holding it:

  ucmerced         UCMerced_LandUse/Images/<class>/<class>NN.tif   21 classes x 100, 256 px TIFF
  nwpu_resisc45    NWPU-RESISC45/<class>/<class>_NNN.jpg           45 classes x 700, 256 px JPEG
  aid              AID/<Class>/<class>_N.jpg                       30 classes, 10000, 600 px JPEG
  whu_rs19         WHU-RS19/<Class>/<class>_NN.jpg                 19 classes, 1005, 600 px JPEG
  rsvqa_lr         LR_split_{train,val,test}_{questions,answers,images}.json, Images_LR/<id>.tif
  rsvqa_hr         USGS_split_{train,val,test,test_phili}_{questions,answers,images}.json,
                   Data/<id>.tif (the same schema as LR: questions {"questions": [{"id",
                   "img_id", "type", "question", "answers_ids", "active"}]}, answers {"answers":
                   [{"id", "question_id", "answer", "active"}]}, images {"images": [{"id",
                   "questions_ids", "active"}]}); test_phili is HR's second test set
  dior_rsvg        DIOR_RSVG/Annotations/NNNNN.xml (VOC: <filename>, <size>, <object> with
                   <name>, <bndbox>, <description>), JPEGImages/NNNNN.jpg, {train,val,test}.txt:
                   one integer per line, the index of an <object> counted over all annotation
                   files in file-name order (the RSVG-pytorch loader's convention)
  ucm_captions     UCM_captions/dataset.json + imgs/<filename>
  sydney_captions  Sydney_captions/dataset.json + imgs/<filename>
  rsicd            RSICD/dataset_rsicd.json + RSICD_images/<filename>
                   (these three Karpathy style: {"images": [{"filename", "imgid", "split",
                   "sentences": [{"raw"}]}]})
  nwpu_captions    NWPU-Captions/dataset_nwpu.json + NWPU_images/<category>/<filename> (the
                   NWPU-RESISC45 images): {category: [{"filename", "imgid", "split", "raw",
                   "raw_1", ..., "raw_4", ...}]}, five captions per image
  dota_v2_counting DOTA-v2.0/{train,val}/images/[<part>/]PNNNN.png and
                   {train,val}/labelTxt-v2.0/DOTA-v2.0_{train,val}/PNNNN.txt (also accepted:
                   DOTA-v2.0_<split>_hbb/, labelTxt-v2.0/ or labelTxt/ directly; the first that
                   holds .txt files is read): `x1 y1 ... x4 y4 category difficult`
                   lines after optional imagesource:/gsd: header lines; no test labels are public
  hrrsd_counting   HRRSD/OPT2017/{Annotations/<id>.xml (VOC), JPEGImages/<id>.jpg,
                   ImageSets/Main/{train,val,test}.txt (one image id per line)}
  rsod_counting    RSOD-Dataset/{aircraft,oiltank,overpass,playground}/Annotation/xml/<name>.xml
                   (VOC; <class>/Annotations/ also accepted) + <class>/JPEGImages/<name>.jpg:
                   one folder per class (the four archives unpacked side by side), each image
                   annotated for its folder's class

Samples (human turn after `<image>\\n`; the records' task/granularity are set from the task):
  scene classification  "Classify the scene of this image into one of these classes: a, b, ...
                        Answer with the class name." -> the class name, lower-case, '_' -> ' ',
                        run-together names split into words ('denseresidential', AID's
                        'DenseResidential' -> 'dense residential')
  VQA (RSVQA LR, HR)    "{question} Answer the question using a single word or phrase." -> answer;
                        type count -> counting/local, other types -> vqa/mixed
  grounding (DIOR-RSVG) "[refer] {description}" -> the GeoChat box `{<x1><y1><x2><y2>}`; the record
                        keeps the exact pixel box, labelled with the object's class
  captioning            "Describe the image in one sentence." -> the first reference caption
  counting (DOTA-v2, HRRSD, RSOD)  "How many {class plural} are in this image? Answer with a
                        number." -> the count (counting.py: which classes are asked, and why)

Splits: RSVQA, DIOR-RSVG, the caption sets, DOTA-v2 (train, val) and HRRSD have official ones.
UC Merced, NWPU-RESISC45, AID, WHU-RS19 and RSOD have none: if `<prefix>-{train,val,test}.txt`
lists of file names are in manual_dir (the torchgeo files uc_merced-*.txt / resisc45-*.txt; aid-,
whu_rs19-, rsod-*.txt the same way), they are used; otherwise each class (RSOD: each class folder)
is shuffled with `seed` and cut 60% train / 20% val / 20% test (STRATIFIED_SPLIT), the ratio of
those lists.

Evaluation extras go to Record.meta: RSVQA {"question_type", "question_id", "image_id"} (the type
is also the last part of the record id, `rsvqa_lr/<split>/<question id>/<type>`), captions
{"references": [all captions, the answer first]}, counting {"category", "count", "image_id"}.

A file of the layout that is missing raises LayoutError naming the expected path and the layout;
a broken sample is skipped and counted (convert/__init__.py), and so is an image of more than
max_image_pixels pixels (DOTA's largest images exceed the default 8192*8192: raise it to keep
them) or an image file name from an annotation that resolves outside its images folder. A
DIOR-RSVG annotation file that does not parse raises too: its object count is unknown, so every
later split index would shift.
"""
import functools
import json
import logging
import re
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from etils import epath

from skymoe_jax import storage
from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data import records
from skymoe_jax.data import template
from skymoe_jax.data.convert import NO_SPLIT, Sample, Skip, Skips, SourceSpec, image_path
from skymoe_jax.data.convert import load_image
from skymoe_jax.data.convert import counting

log = logging.getLogger(__name__)

IMAGE = template.LLAVA_V1.image_placeholder
SPLITS = ('train', 'val', 'test')
STRATIFIED_SPLIT = (('train', 0.6), ('val', 0.2), ('test', 0.2))
IMAGE_SUFFIXES = ('.tif', '.tiff', '.jpg', '.jpeg', '.png', '.bmp')
VERSION = '1.0.0'

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
AID_CLASSES = (
    'Airport', 'BareLand', 'BaseballField', 'Beach', 'Bridge', 'Center', 'Church', 'Commercial',
    'DenseResidential', 'Desert', 'Farmland', 'Forest', 'Industrial', 'Meadow',
    'MediumResidential', 'Mountain', 'Park', 'Parking', 'Playground', 'Pond', 'Port',
    'RailwayStation', 'Resort', 'River', 'School', 'SparseResidential', 'Square', 'Stadium',
    'StorageTanks', 'Viaduct')
WHU_RS19_CLASSES = (
    'Airport', 'Beach', 'Bridge', 'Commercial', 'Desert', 'Farmland', 'footballField', 'Forest',
    'Industrial', 'Meadow', 'Mountain', 'Park', 'Parking', 'Pond', 'Port', 'railwayStation',
    'Residential', 'River', 'Viaduct')
assert (len(UCMERCED_CLASSES), len(RESISC45_CLASSES), len(AID_CLASSES),
        len(WHU_RS19_CLASSES)) == (21, 45, 30, 19)

# As stated where the datasets are distributed; 'unknown' where no licence is stated. Override
# with licence=... when you know better.
LICENCES = {
    'ucmerced': 'public domain (USGS National Map imagery)',
    'nwpu_resisc45': 'CC BY-NC 4.0',
    'aid': 'unknown', 'whu_rs19': 'unknown', 'rsvqa_lr': 'unknown', 'rsvqa_hr': 'unknown',
    'dior_rsvg': 'unknown', 'ucm_captions': 'unknown', 'sydney_captions': 'unknown',
    'rsicd': 'unknown', 'nwpu_captions': 'unknown',
    'dota_v2_counting': ('academic use only, commercial use prohibited; Google Earth images '
                         'under the Google Earth terms of use'),
    'hrrsd_counting': 'unknown', 'rsod_counting': 'unknown',
}

RSVQA_TYPES = ('presence', 'comparison', 'rural_urban', 'count', 'area')
VQA_SUFFIX = ' Answer the question using a single word or phrase.'
CAPTION_PROMPT = 'Describe the image in one sentence.'


class LayoutError(FileNotFoundError):
  """A file or folder of a benchmark's published layout is not in manual_dir."""


def _layout_error(name: str, expected, layout: str) -> LayoutError:
  return LayoutError(f'{name}: expected {expected} (published layout under manual_dir: {layout}); '
                     'place the files by hand, nothing is downloaded')


def _root(manual_dir, folders, markers, name: str, layout: str) -> epath.Path:
  """The first of manual_dir/<each of folders>, then manual_dir itself, that holds one of
  `markers` (folders: the spellings a dataset ships under; markers: one name or several)."""
  manual_dir = storage.path(manual_dir)
  folders = (folders,) if isinstance(folders, str) else tuple(folders)
  markers = (markers,) if isinstance(markers, str) else tuple(markers)
  for root in [manual_dir / f for f in folders] + [manual_dir]:
    if any((root / m).exists() for m in markers):
      return root
  raise _layout_error(name, manual_dir / folders[0] / markers[0], layout)


def _cached_loader(max_pixels: int):
  # Several samples share an image (RSVQA: ~100 questions each; DIOR-RSVG: a few objects each).
  return functools.lru_cache(maxsize=64)(functools.partial(load_image, max_pixels=max_pixels))


def _json(path: epath.Path):
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not JSON ({e})') from None


def _json_list(path: epath.Path, key: str) -> List:
  data = _json(path)
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise ValueError(f'{path}: expected {{"{key}": [...]}}')
  return data[key]


def _need(obj: Dict, key: str, types):
  value = obj.get(key) if isinstance(obj, dict) else None
  if value is None or isinstance(value, bool) or not isinstance(value, types):
    raise Skip('missing_field', key, 'absent' if value is None else type(value).__name__)
  return value


def _by_name(paths: Iterable[epath.Path]) -> List[epath.Path]:
  return sorted(paths, key=lambda p: p.name)


# ------------------------------------------------------------------------ scene classification

def class_answer(name: str) -> str:
  """A class folder name as an answer: 'dense_residential', 'DenseResidential', UC Merced's
  'denseresidential' -> 'dense residential'."""
  if name.lower() in UCMERCED_NAMES:
    return UCMERCED_NAMES[name.lower()]
  return re.sub(r'(?<=[a-z])(?=[A-Z])', ' ', name).lower().replace('_', ' ')


def classification_prompt(classes: Sequence[str]) -> str:
  names = ', '.join(sorted({class_answer(c) for c in classes}))
  return (f'{IMAGE}\nClassify the scene of this image into one of these classes: {names}. '
          'Answer with the class name.')


def _split_of_file(path, listed, split_of, list_prefix: str, skips: Skips) -> Optional[str]:
  """The split of an image file: from the `<list_prefix>-*.txt` lists when they were given
  (None, counted as not_in_split_lists, for a file in none of them), else the stratified one."""
  if listed is None:
    return split_of[str(path)]
  split = listed.get(path.name, listed.get(path.stem))
  if split is None:
    skips.add(Skip('not_in_split_lists', 'file name',
                   f'{path.name} is in none of {list_prefix}-*.txt'), path, path.name)
  return split


def stratified_split(files_by_class: Dict[str, List], seed: int,
                     fractions=STRATIFIED_SPLIT) -> Dict[str, str]:
  """{str(file): split}: each class shuffled with one seeded generator (classes in sorted order)
  and cut by `fractions`; the first split takes the rounding remainder."""
  rng = np.random.default_rng(seed)
  out = {}
  for cls in sorted(files_by_class):
    files = sorted(str(f) for f in files_by_class[cls])
    order = rng.permutation(len(files))
    sizes = [int(round(f * len(files))) for _, f in fractions[1:]]
    sizes.insert(0, len(files) - sum(sizes))
    start = 0
    for (split, _), size in zip(fractions, sizes):
      for i in order[start:start + size]:
        out[files[i]] = split
      start += size
  return out


def _list_splits(manual_dir, prefix: str) -> Optional[Dict[str, str]]:
  """{file name: split} from `<prefix>-{train,val,test}.txt` in manual_dir, or None."""
  manual_dir = storage.path(manual_dir)
  paths = {s: manual_dir / f'{prefix}-{s}.txt' for s in SPLITS}
  if not any(p.exists() for p in paths.values()):
    return None
  out = {}
  for split, path in paths.items():
    if path.exists():
      for line in path.read_text().split():
        out[line.strip()] = split
        out.setdefault(epath.Path(line.strip()).stem, split)  # lists without extensions too
  return out


def _split_rule(listed, prefix: str, seed: int) -> str:
  return (f'lists {prefix}-*.txt' if listed is not None else
          f'stratified {dict(STRATIFIED_SPLIT)} seed {seed}')


def _class_root(manual_dir, folders: Sequence[str], classes: Sequence[str], name: str,
                layout: str) -> epath.Path:
  """The folder holding the class folders: a published class name (any case) is the marker."""
  manual_dir = storage.path(manual_dir)
  wanted = {class_answer(c) for c in classes}
  for candidate in [manual_dir / f for f in folders] + [manual_dir]:
    if candidate.is_dir() and any(p.is_dir() and class_answer(p.name) in wanted
                                  for p in candidate.iterdir()):
      return candidate
  raise _layout_error(name, manual_dir / folders[0] / '<class>', layout)


def _classification(name: str, image_root: epath.Path, manual_dir, classes: Sequence[str],
                    list_prefix: str, skips: Skips, seed: int, licence: str,
                    max_image_pixels: int) -> Iterable[Sample]:
  files_by_class: Dict[str, List[epath.Path]] = {}
  for folder in _by_name(p for p in image_root.iterdir() if p.is_dir()):
    files = []
    for path in _by_name(folder.iterdir()):
      if path.suffix.lower() in IMAGE_SUFFIXES:
        files.append(path)
      else:  # e.g. Thumbs.db: counted so that nothing in a class folder vanishes unseen
        skips.add(Skip('not_an_image_file', 'file name', path.suffix), path, path.name)
    if files:
      files_by_class[folder.name] = files
  if not files_by_class:
    raise _layout_error(name, image_root / '<class>', f'{image_root}/<class>/<image>')
  found = {class_answer(c) for c in files_by_class}
  published = {class_answer(c) for c in classes}
  if found != published:
    log.warning('%s: class folders differ from the published %d: missing %s, extra %s', name,
                len(classes), sorted(published - found), sorted(found - published))
  listed = _list_splits(manual_dir, list_prefix)
  split_of = None if listed is not None else stratified_split(files_by_class, seed)
  log.info('%s: %d classes, split by %s', name, len(files_by_class),
           _split_rule(listed, list_prefix, seed))
  # The prompt lists the benchmark's vocabulary, whatever subset of it is on disk.
  prompt = classification_prompt(sorted(set(classes) | set(files_by_class)))

  def generate():
    for cls, files in sorted(files_by_class.items()):
      for path in files:
        split = _split_of_file(path, listed, split_of, list_prefix, skips)
        if split is None:
          continue

        def make(path=path, cls=cls):
          image = load_image(path, max_pixels=max_image_pixels)
          return records.Record(
              id=f'{name}/{cls}/{path.stem}', image=image.data,
              conversations=[{'from': 'human', 'value': prompt},
                             {'from': 'gpt', 'value': class_answer(cls)}],
              task='scene_classification', granularity='global', source=name,
              licence=licence)
        yield split, path, path.name, make
  return generate()


UCMERCED_LAYOUT = 'UCMerced_LandUse/Images/<class>/<class>NN.tif'
RESISC45_LAYOUT = 'NWPU-RESISC45/<class>/<class>_NNN.jpg'
AID_LAYOUT = 'AID/<Class>/<class>_N.jpg (30 class folders, e.g. AID/BareLand/bareland_1.jpg)'
WHU_RS19_LAYOUT = 'WHU-RS19/<Class>/<class>_NN.jpg (19 class folders, e.g. Airport/airport_01.jpg)'
CLASS_LISTS = ('optional split lists <prefix>-{train,val,test}.txt of file names in manual_dir; '
               'without them a stratified 60/20/20 split seeded by --seed')


def ucmerced_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                     max_image_pixels: int) -> Iterable[Sample]:
  root = _root(manual_dir, 'UCMerced_LandUse', 'Images', 'ucmerced', UCMERCED_LAYOUT)
  return _classification('ucmerced', root / 'Images', manual_dir, UCMERCED_CLASSES, 'uc_merced',
                         skips, seed, licence, max_image_pixels)


def nwpu_resisc45_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                          max_image_pixels: int) -> Iterable[Sample]:
  root = _class_root(manual_dir, ('NWPU-RESISC45',), RESISC45_CLASSES, 'nwpu_resisc45',
                     RESISC45_LAYOUT)
  return _classification('nwpu_resisc45', root, manual_dir, RESISC45_CLASSES, 'resisc45', skips,
                         seed, licence, max_image_pixels)


def aid_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                max_image_pixels: int) -> Iterable[Sample]:
  root = _class_root(manual_dir, ('AID', 'AID_dataset'), AID_CLASSES, 'aid', AID_LAYOUT)
  return _classification('aid', root, manual_dir, AID_CLASSES, 'aid', skips, seed, licence,
                         max_image_pixels)


def whu_rs19_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                     max_image_pixels: int) -> Iterable[Sample]:
  root = _class_root(manual_dir, ('WHU-RS19', 'WHU_RS19', 'RSDataset'), WHU_RS19_CLASSES,
                     'whu_rs19', WHU_RS19_LAYOUT)
  return _classification('whu_rs19', root, manual_dir, WHU_RS19_CLASSES, 'whu_rs19', skips, seed,
                         licence, max_image_pixels)


# --------------------------------------------------------------------------------- RSVQA LR, HR

RSVQA_LR_LAYOUT = ('LR_split_{train,val,test}_{questions,answers,images}.json + '
                   'Images_LR/<img_id>.tif')
RSVQA_HR_LAYOUT = ('USGS_split_{train,val,test,test_phili}_{questions,answers,images}.json + '
                   'Data/<img_id>.tif')


def _rsvqa(name: str, manual_dir, folders, prefix: str, images_dir: str, splits: Sequence[str],
           layout: str, skips: Skips, licence: str, max_image_pixels: int) -> Iterable[Sample]:
  root = _root(manual_dir, folders, images_dir, name, layout)
  files = {s: {k: root / f'{prefix}_{s}_{k}.json' for k in ('questions', 'answers', 'images')}
           for s in splits}
  present = [s for s in splits if any(p.exists() for p in files[s].values())]
  if not present:
    raise _layout_error(name, files['train']['questions'], layout)
  for s in present:
    for path in files[s].values():
      if not path.exists():
        raise _layout_error(name, path, layout)
  loader = _cached_loader(max_image_pixels)

  def generate():
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

        def make(q=q, split=split, images=images, answers=answers):
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
          image = loader(root / images_dir / f'{img_id}.tif')
          task, granularity = ('counting', 'local') if qtype == 'count' else ('vqa', 'mixed')
          return records.Record(
              id=f'{name}/{split}/{qid}/{qtype}', image=image.data,
              conversations=[{'from': 'human', 'value': f'{IMAGE}\n{question}{VQA_SUFFIX}'},
                             {'from': 'gpt', 'value': found[0]['answer'].strip()}],
              task=task, granularity=granularity, source=name, licence=licence,
              meta=dict(question_type=qtype, question_id=qid, image_id=img_id))
        qid = q.get('id') if isinstance(q, dict) else None
        yield split, files[split]['questions'], f'question {qid!r} (index {n})', make
  return generate()


def rsvqa_lr_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                     max_image_pixels: int) -> Iterable[Sample]:
  del seed  # official splits
  return _rsvqa('rsvqa_lr', manual_dir, ('RSVQA_LR', 'RSVQA-LR'), 'LR_split', 'Images_LR', SPLITS,
                RSVQA_LR_LAYOUT, skips, licence, max_image_pixels)


def rsvqa_hr_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                     max_image_pixels: int) -> Iterable[Sample]:
  del seed  # official splits
  return _rsvqa('rsvqa_hr', manual_dir, ('RSVQA_HR', 'RSVQA-HR'), 'USGS_split', 'Data',
                SPLITS + ('test_phili',), RSVQA_HR_LAYOUT, skips, licence, max_image_pixels)


# ----------------------------------------------------------------------------------- DIOR-RSVG

DIOR_LAYOUT = 'DIOR_RSVG/{Annotations/*.xml, JPEGImages/*.jpg, train.txt, val.txt, test.txt}'


def _sort_key(path):
  return (0, int(path.stem), '') if path.stem.isdigit() else (1, 0, path.stem)


def _text(element, path: str) -> Optional[str]:
  found = element.find(path)
  return None if found is None or found.text is None else found.text.strip()


def dior_objects(annotations) -> List:
  """(xml file, its root, object element) of every <object>, in split-index order."""
  out = []
  for path in sorted(storage.path(annotations).glob('*.xml'), key=_sort_key):
    try:
      root = ET.fromstring(path.read_bytes())
    except ET.ParseError as e:
      raise ValueError(f'{path}: annotation does not parse ({e}); its objects cannot be counted, '
                       'so the split indices after it would be wrong') from None
    out.extend((path, root, obj) for obj in root.findall('object'))
  return out


def dior_rsvg_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                      max_image_pixels: int) -> Iterable[Sample]:
  del seed  # official splits
  name = 'dior_rsvg'
  root = _root(manual_dir, ('DIOR_RSVG', 'DIOR-RSVG'), 'Annotations', name, DIOR_LAYOUT)
  if not (root / 'JPEGImages').is_dir():
    raise _layout_error(name, root / 'JPEGImages', DIOR_LAYOUT)
  split_files = {s: root / f'{s}.txt' for s in SPLITS if (root / f'{s}.txt').exists()}
  if not split_files:
    raise _layout_error(name, root / 'train.txt', DIOR_LAYOUT)
  split_of: Dict[int, str] = {}
  for split, path in split_files.items():
    for n, line in enumerate(path.read_text().split('\n'), 1):
      if line.strip():
        if not line.strip().isdigit():
          raise ValueError(f'{path} line {n}: {line.strip()!r} is not an object index')
        split_of[int(line)] = split
  objects = dior_objects(root / 'Annotations')
  for index in sorted(set(split_of) - set(range(len(objects)))):
    skips.add(Skip('index_not_found', 'index', f'only {len(objects)} objects'),
              split_files[split_of[index]], f'index {index}', split_of[index])
  skips.count('not_in_split', len(set(range(len(objects))) - set(split_of)))
  loader = _cached_loader(max_image_pixels)

  def generate():
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
  return generate()


# ---------------------------------------------------------------------------------- captioning

def _caption_record(name: str, split: str, key, image, captions: List[str],
                    licence: str) -> records.Record:
  return records.Record(
      id=f'{name}/{split}/{key}', image=image.data,
      conversations=[{'from': 'human', 'value': f'{IMAGE}\n{CAPTION_PROMPT}'},
                     {'from': 'gpt', 'value': captions[0]}],
      task='captioning', granularity='global', source=name, licence=licence,
      meta=dict(references=captions))


def _karpathy(name: str, manual_dir, folders, json_name: str, images_dir: str, skips: Skips,
              licence: str, max_image_pixels: int) -> Iterable[Sample]:
  layout = f'{json_name} (Karpathy style) + {images_dir}/<filename>'
  root = _root(manual_dir, folders, json_name, name, layout)
  if not (root / images_dir).is_dir():
    raise _layout_error(name, root / images_dir, layout)
  entries = _json_list(root / json_name, 'images')

  def generate():
    for n, entry in enumerate(entries):
      split = entry.get('split') if isinstance(entry, dict) else None
      where = f'image {n} ({entry.get("filename") if isinstance(entry, dict) else entry!r})'
      if split not in SPLITS:
        skips.add(Skip('unknown_split', 'split', repr(split)), root / json_name, where)
        continue

      def make(entry=entry, split=split):
        filename = _need(entry, 'filename', str)
        sentences = _need(entry, 'sentences', list)
        captions = [s.get('raw', '').strip() for s in sentences if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not captions:
          raise Skip('missing_field', 'sentences', 'no caption with a "raw" text')
        image = load_image(image_path(root / images_dir, filename), max_pixels=max_image_pixels)
        key = entry.get('imgid', epath.Path(filename).stem)
        return _caption_record(name, split, key, image, captions, licence)
      yield split, root / json_name, where, make
  return generate()


def ucm_captions_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                         max_image_pixels: int) -> Iterable[Sample]:
  del seed  # official splits
  return _karpathy('ucm_captions', manual_dir, ('UCM_captions', 'UCM-Captions', 'UCM_Captions'),
                   'dataset.json', 'imgs', skips, licence, max_image_pixels)


def sydney_captions_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                            max_image_pixels: int) -> Iterable[Sample]:
  del seed  # official splits
  return _karpathy('sydney_captions', manual_dir,
                   ('Sydney_captions', 'Sydney-Captions', 'Sydney_Captions'), 'dataset.json',
                   'imgs', skips, licence, max_image_pixels)


def rsicd_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                  max_image_pixels: int) -> Iterable[Sample]:
  del seed  # official splits
  return _karpathy('rsicd', manual_dir, ('RSICD',), 'dataset_rsicd.json', 'RSICD_images', skips,
                   licence, max_image_pixels)


NWPU_CAPTIONS_LAYOUT = ('NWPU-Captions/dataset_nwpu.json ({category: [{"filename", "imgid", '
                        '"split", "raw", "raw_1", ..., "raw_4"}]}) + '
                        'NWPU_images/<category>/<filename>')
NWPU_CAPTION_KEYS = ('raw', 'raw_1', 'raw_2', 'raw_3', 'raw_4')


def nwpu_captions_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                          max_image_pixels: int) -> Iterable[Sample]:
  """Record ids are nwpu_captions/<split>/<category>/<file stem>: unique whether or not imgid
  restarts in each category."""
  del seed  # official splits
  name = 'nwpu_captions'
  root = _root(manual_dir, ('NWPU-Captions', 'NWPU_Captions'), 'dataset_nwpu.json', name,
               NWPU_CAPTIONS_LAYOUT)
  images = root / 'NWPU_images'
  if not images.is_dir():
    raise _layout_error(name, images, NWPU_CAPTIONS_LAYOUT)
  json_file = root / 'dataset_nwpu.json'
  data = _json(json_file)
  if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
    raise ValueError(f'{json_file}: expected {{category: [image entries]}}')

  def generate():
    for category in sorted(data):
      for n, entry in enumerate(data[category]):
        split = entry.get('split') if isinstance(entry, dict) else None
        where = (f'{category} image {n} '
                 f'({entry.get("filename") if isinstance(entry, dict) else entry!r})')
        if split not in SPLITS:
          skips.add(Skip('unknown_split', 'split', repr(split)), json_file, where)
          continue

        def make(entry=entry, split=split, category=category):
          filename = _need(entry, 'filename', str)
          captions = [entry.get(k) for k in NWPU_CAPTION_KEYS]
          captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
          if not captions:
            raise Skip('missing_field', 'raw', f'none of {NWPU_CAPTION_KEYS} holds a caption')
          image = load_image(image_path(images, f'{category}/{filename}'),
                             max_pixels=max_image_pixels)
          key = f'{category}/{epath.Path(filename).stem}'
          return _caption_record(name, split, key, image, captions, licence)
        yield split, json_file, where, make
  return generate()


# ----------------------------------------------------------------------------------- counting

DOTA_LAYOUT = ('DOTA-v2.0/{train,val}/images/[<part>/]PNNNN.png + '
               '{train,val}/labelTxt-v2.0/DOTA-v2.0_{train,val}/PNNNN.txt (or '
               'DOTA-v2.0_{train,val}_hbb/, labelTxt-v2.0/, labelTxt/)')
HRRSD_LAYOUT = ('HRRSD/OPT2017/{Annotations/<id>.xml, JPEGImages/<id>.jpg, '
                'ImageSets/Main/{train,val,test}.txt}')
RSOD_LAYOUT = ('RSOD-Dataset/<class>/{Annotation/xml/<name>.xml (or Annotations/), '
               'JPEGImages/<name>.jpg} for class in aircraft, oiltank, overpass, playground')


def _unannotated(images: Dict[str, epath.Path], annotated, skips: Skips, split: str) -> None:
  """Counts the images that have no annotation file: nothing on disk vanishes unseen."""
  for stem in sorted(set(images) - set(annotated)):
    skips.add(Skip('missing_annotation', 'annotation', f'no annotation for {images[stem].name}'),
              images[stem], stem, split)


def _find(images: Dict[str, epath.Path], stem: str, folder) -> epath.Path:
  if stem not in images:
    raise Skip('missing_image', 'image', f'no image {stem}.* in {folder}')
  return images[stem]


def dota_v2_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                    max_image_pixels: int) -> Iterable[Sample]:
  name, vocabulary = 'dota_v2_counting', counting.DOTA_V2_CLASSES
  root = _root(manual_dir, ('DOTA-v2.0', 'DOTA_v2', 'DOTA-v2', 'DOTA'), ('train', 'val'), name,
               DOTA_LAYOUT)
  present = {}
  for split in ('train', 'val'):
    if not (root / split).is_dir():
      continue
    v2 = root / split / 'labelTxt-v2.0'
    candidates = [v2 / f'DOTA-v2.0_{split}', v2 / f'DOTA-v2.0_{split}_hbb', v2,
                  root / split / 'labelTxt']
    labels = next((c for c in candidates if c.is_dir() and any(c.glob('*.txt'))), None)
    if labels is None or not (root / split / 'images').is_dir():
      raise _layout_error(name, candidates[0] if labels is None else root / split / 'images',
                          DOTA_LAYOUT)
    images = {}
    for pattern in ('*.png', '*/*.png'):  # images/ or the parts' subfolders (images/part4/...)
      for path in _by_name((root / split / 'images').glob(pattern)):
        images.setdefault(path.stem, path)
    present[split] = (labels, images)

  def generate():
    for split, (labels, images) in present.items():
      files = _by_name(labels.glob('*.txt'))
      _unannotated(images, {f.stem for f in files}, skips, split)
      for path in files:
        yield from counting.image_samples(
            name, split, path.stem, path,
            functools.partial(counting.parse_dota_file, path, vocabulary),
            functools.partial(_find, images, path.stem, root / split / 'images'), vocabulary,
            skips, seed=seed, licence=licence, max_image_pixels=max_image_pixels, ask_absent=True)
  return generate()


def hrrsd_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                  max_image_pixels: int) -> Iterable[Sample]:
  """Images are JPEGImages/<id>.jpg for the ids of the split lists (not the XML's <filename>)."""
  name, vocabulary = 'hrrsd_counting', counting.HRRSD_CLASSES
  root = _root(manual_dir, ('HRRSD/OPT2017', 'TGRS-HRRSD-Dataset/OPT2017', 'OPT2017', 'HRRSD'),
               'Annotations', name, HRRSD_LAYOUT)
  lists = {s: root / 'ImageSets' / 'Main' / f'{s}.txt' for s in SPLITS}
  lists = {s: p for s, p in lists.items() if p.exists()}
  if not lists:
    raise _layout_error(name, root / 'ImageSets' / 'Main' / 'train.txt', HRRSD_LAYOUT)
  ids = {s: [line.split()[0] for line in p.read_text().splitlines() if line.strip()]
         for s, p in lists.items()}
  listed = {i for s in ids.values() for i in s}
  annotations = {p.stem for p in (root / 'Annotations').glob('*.xml')}
  skips.count('not_in_split', len(annotations - listed))

  def generate():
    for split, split_ids in ids.items():
      for image_id in split_ids:
        xml = root / 'Annotations' / f'{image_id}.xml'

        def parse(xml=xml):
          if not xml.exists():
            raise Skip('missing_annotation', 'annotation', f'no file {xml}')
          return counting.parse_voc(xml.read_bytes(), vocabulary)
        yield from counting.image_samples(
            name, split, image_id, xml, parse,
            functools.partial(image_path, root / 'JPEGImages', f'{image_id}.jpg'), vocabulary,
            skips, seed=seed, licence=licence, max_image_pixels=max_image_pixels, ask_absent=True)
  return generate()


def rsod_samples(manual_dir, skips: Skips, *, seed: int, licence: str,
                 max_image_pixels: int) -> Iterable[Sample]:
  """Splits: rsod-{train,val,test}.txt lists of annotation file names, or stratified over each
  class folder's annotation files."""
  name, vocabulary = 'rsod_counting', counting.RSOD_CLASSES
  root = _root(manual_dir, ('RSOD-Dataset', 'RSOD-Dataset-', 'RSOD'), tuple(vocabulary), name,
               RSOD_LAYOUT)
  files_by_class, images_by_class = {}, {}
  for cls in vocabulary:
    if not (root / cls).is_dir():
      continue
    candidates = [root / cls / 'Annotation' / 'xml', root / cls / 'Annotations']
    xml_dir = next((c for c in candidates if c.is_dir()), None)
    if xml_dir is None or not (root / cls / 'JPEGImages').is_dir():
      raise _layout_error(name, candidates[0] if xml_dir is None else root / cls / 'JPEGImages',
                          RSOD_LAYOUT)
    files_by_class[cls] = _by_name(xml_dir.glob('*.xml'))
    images_by_class[cls] = {p.stem: p for p in (root / cls / 'JPEGImages').iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES}
  listed = _list_splits(manual_dir, 'rsod')
  split_of = None if listed is not None else stratified_split(files_by_class, seed)
  log.info('%s: split by %s', name, _split_rule(listed, 'rsod', seed))

  def generate():
    for cls, files in files_by_class.items():
      images = images_by_class[cls]
      _unannotated(images, {f.stem for f in files}, skips, NO_SPLIT)
      for path in files:
        split = _split_of_file(path, listed, split_of, 'rsod', skips)
        if split is None:
          continue
        yield from counting.image_samples(
            name, split, f'{cls}/{path.stem}', path,
            lambda path=path: counting.parse_voc(path.read_bytes(), vocabulary),
            functools.partial(_find, images, path.stem, root / cls / 'JPEGImages'), vocabulary,
            skips, seed=seed, licence=licence, max_image_pixels=max_image_pixels,
            ask_absent=False)
  return generate()


# ------------------------------------------------------------------------------------- table

def _spec(name: str, description: str, homepage: str, citation: str, layout: str, samples,
          splits=SPLITS) -> SourceSpec:
  return SourceSpec(name=name, version=VERSION, description=description, homepage=homepage,
                    citation=citation.strip() + '\n', licence=LICENCES[name],
                    layout=layout, splits=tuple(splits), samples=samples)


CLASSIFICATION = 'Scene classification: the class name, asked with the list of all classes.'
CAPTIONING = 'Captioning: one reference caption as the answer, all of them in meta.references.'
COUNTING = ('Counting from box annotations: "How many <class plural> are in this image?" -> the '
            'count, with the boxes of that class.')

RSVQA_CITATION = """
@article{lobry2020rsvqa,
  title={RSVQA: Visual Question Answering for Remote Sensing Data},
  author={Lobry, Sylvain and Marcos, Diego and Murray, Jesse and Tuia, Devis},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={58},
  number={12},
  pages={8555--8566},
  year={2020}
}"""
QU_CITATION = """
@inproceedings{qu2016deep,
  title={Deep semantic understanding of high resolution remote sensing image},
  author={Qu, Bo and Li, Xuelong and Tao, Dacheng and Lu, Xiaoqiang},
  booktitle={2016 International Conference on Computer, Information and Telecommunication
             Systems (CITS)},
  pages={1--5},
  year={2016}
}"""

SOURCES: Dict[str, SourceSpec] = {s.name: s for s in (
    _spec('ucmerced', f'UC Merced Land Use, 21 classes x 100 images. {CLASSIFICATION}',
          'http://weegee.vision.ucmerced.edu/datasets/landuse.html', """
@inproceedings{yang2010bag,
  title={Bag-of-visual-words and spatial extensions for land-use classification},
  author={Yang, Yi and Newsam, Shawn},
  booktitle={Proceedings of the 18th SIGSPATIAL International Conference on Advances in
             Geographic Information Systems},
  pages={270--279},
  year={2010}
}""", f'{UCMERCED_LAYOUT}; {CLASS_LISTS} (prefix uc_merced, the torchgeo lists)',
          ucmerced_samples),
    _spec('nwpu_resisc45', f'NWPU-RESISC45, 45 classes x 700 images. {CLASSIFICATION}',
          'http://www.escience.cn/people/JunweiHan/NWPU-RESISC45.html', """
@article{cheng2017remote,
  title={Remote Sensing Image Scene Classification: Benchmark and State of the Art},
  author={Cheng, Gong and Han, Junwei and Lu, Xiaoqiang},
  journal={Proceedings of the IEEE},
  volume={105},
  number={10},
  pages={1865--1883},
  year={2017}
}""", f'{RESISC45_LAYOUT}; {CLASS_LISTS} (prefix resisc45, the torchgeo lists)',
          nwpu_resisc45_samples),
    _spec('aid', f'AID, 30 aerial scene classes, 10000 images. {CLASSIFICATION}',
          'https://captain-whu.github.io/AID/', """
@article{xia2017aid,
  title={AID: A Benchmark Data Set for Performance Evaluation of Aerial Scene Classification},
  author={Xia, Gui-Song and Hu, Jingwen and Hu, Fan and Shi, Baoguang and Bai, Xiang and
          Zhong, Yanfei and Zhang, Liangpei and Lu, Xiaoqiang},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={55},
  number={7},
  pages={3965--3981},
  year={2017}
}""", f'{AID_LAYOUT}; {CLASS_LISTS} (prefix aid)', aid_samples),
    _spec('whu_rs19', f'WHU-RS19, 19 satellite scene classes. {CLASSIFICATION}',
          'https://captain-whu.github.io/BED4RS/', """
@article{dai2011satellite,
  title={Satellite Image Classification via Two-Layer Sparse Coding With Biased Image
         Representation},
  author={Dai, Dengxin and Yang, Wen},
  journal={IEEE Geoscience and Remote Sensing Letters},
  volume={8},
  number={1},
  pages={173--176},
  year={2011}
}""", f'{WHU_RS19_LAYOUT}; {CLASS_LISTS} (prefix whu_rs19)', whu_rs19_samples),
    _spec('rsvqa_lr', 'RSVQA low resolution (Sentinel-2): VQA; count questions are counting.',
          'https://rsvqa.sylvainlobry.com/', RSVQA_CITATION, RSVQA_LR_LAYOUT, rsvqa_lr_samples),
    _spec('rsvqa_hr', 'RSVQA high resolution (USGS aerial): VQA; count questions are counting; '
          'test_phili is the second test set (Philadelphia).',
          'https://rsvqa.sylvainlobry.com/', RSVQA_CITATION, RSVQA_HR_LAYOUT, rsvqa_hr_samples,
          SPLITS + ('test_phili',)),
    _spec('dior_rsvg', 'DIOR-RSVG visual grounding: a referring expression -> its GeoChat box.',
          'https://github.com/ZhanYang-nwpu/RSVG-pytorch', """
@article{zhan2023rsvg,
  title={RSVG: Exploring Data and Models for Visual Grounding on Remote Sensing Data},
  author={Zhan, Yang and Xiong, Zhitong and Yuan, Yuan},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={61},
  year={2023}
}""", DIOR_LAYOUT, dior_rsvg_samples),
    _spec('ucm_captions', f'UCM-Captions, 2100 UC Merced images x 5 captions. {CAPTIONING}',
          'https://github.com/201528014227051/RSICD_optimal', QU_CITATION,
          'UCM_captions/dataset.json (Karpathy style) + imgs/<filename>', ucm_captions_samples),
    _spec('sydney_captions', f'Sydney-Captions, 613 images x 5 captions. {CAPTIONING}',
          'https://github.com/201528014227051/RSICD_optimal', QU_CITATION,
          'Sydney_captions/dataset.json (Karpathy style) + imgs/<filename>',
          sydney_captions_samples),
    _spec('rsicd', f'RSICD, 10921 images x 5 captions. {CAPTIONING}',
          'https://github.com/201528014227051/RSICD_optimal', """
@article{lu2018exploring,
  title={Exploring Models and Data for Remote Sensing Image Caption Generation},
  author={Lu, Xiaoqiang and Wang, Binqiang and Zheng, Xiangtao and Li, Xuelong},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={56},
  number={4},
  pages={2183--2195},
  year={2018}
}""", 'RSICD/dataset_rsicd.json (Karpathy style) + RSICD_images/<filename>', rsicd_samples),
    _spec('nwpu_captions', f'NWPU-Captions, 31500 NWPU-RESISC45 images x 5 captions. {CAPTIONING}',
          'https://github.com/HaiyanHuang98/NWPU-Captions', """
@article{cheng2022nwpu,
  title={NWPU-Captions Dataset and MLCA-Net for Remote Sensing Image Captioning},
  author={Cheng, Qimin and Huang, Haiyan and Xu, Yuan and Zhou, Yuzhuo and Li, Huanying and
          Wang, Zhongyuan},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={60},
  year={2022}
}""", NWPU_CAPTIONS_LAYOUT, nwpu_captions_samples),
    _spec('dota_v2_counting', f'DOTA-v2.0, 18 object classes. {COUNTING}',
          'https://captain-whu.github.io/DOTA/', """
@article{ding2022object,
  title={Object Detection in Aerial Images: A Large-Scale Benchmark and Challenges},
  author={Ding, Jian and Xue, Nan and Xia, Gui-Song and Bai, Xiang and Yang, Wen and
          Yang, Michael Ying and Belongie, Serge and Luo, Jiebo and Datcu, Mihai and
          Pelillo, Marcello and Zhang, Liangpei},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume={44},
  number={11},
  pages={7778--7796},
  year={2022}
}""", DOTA_LAYOUT, dota_v2_samples, ('train', 'val')),
    _spec('hrrsd_counting', f'HRRSD, 13 object classes. {COUNTING}',
          'https://github.com/CrazyStoneonRoad/TGRS-HRRSD-Dataset', """
@article{zhang2019hierarchical,
  title={Hierarchical and Robust Convolutional Neural Network for Very High-Resolution Remote
         Sensing Object Detection},
  author={Zhang, Yuanlin and Yuan, Yuan and Feng, Yachuang and Lu, Xiaoqiang},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={57},
  number={8},
  pages={5535--5548},
  year={2019}
}""", HRRSD_LAYOUT, hrrsd_samples),
    _spec('rsod_counting', f'RSOD, 4 object classes. {COUNTING} Only classes present are asked.',
          'https://github.com/RSIA-LIESMARS-WHU/RSOD-Dataset-', """
@article{long2017accurate,
  title={Accurate Object Localization in Remote Sensing Images Based on Convolutional Neural
         Networks},
  author={Long, Yang and Gong, Yiping and Xiao, Zhifeng and Liu, Qing},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={55},
  number={5},
  pages={2486--2498},
  year={2017}
}""", f'{RSOD_LAYOUT}; {CLASS_LISTS} (prefix rsod, lists of annotation file names)',
          rsod_samples),
)}
assert list(SOURCES) == [
    'ucmerced', 'nwpu_resisc45', 'aid', 'whu_rs19', 'rsvqa_lr', 'rsvqa_hr', 'dior_rsvg',
    'ucm_captions', 'sydney_captions', 'rsicd', 'nwpu_captions', 'dota_v2_counting',
    'hrrsd_counting', 'rsod_counting']
