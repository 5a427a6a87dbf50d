"""Box dialects, task tags and the chat template against hand-worked values."""
import random
import re

import pytest

from skymoe_jax.data.tasks import GRANULARITIES, TASKS
from skymoe_jax.data import boxes
from skymoe_jax.data import tasks
from skymoe_jax.data import template as tmpl
from skymoe_jax.data.boxes import Box


def _close(got, want, tol=1e-9):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert (g.x1, g.y1, g.x2, g.y2) == pytest.approx(w[:4], abs=tol), (g, w)
    if len(w) > 4:
      assert g.angle == w[4]


# ---------------------------------------------------------------------------- box dialects

@pytest.mark.parametrize('dialect,text,size,want', [
    # 200x100 image: x = v/100*200, y = v/100*100.
    ('geochat', '{<10><20><50><60>}', (200, 100), [(20, 20, 100, 60, None)]),
    ('geochat', 'the plane {<10><20><50><60>|<45>} here', (200, 100), [(20, 20, 100, 60, 45.0)]),
    ('geochat', '{<0><0><50><50>}{<50><50><100><100>|<-30>}', (200, 100),
     [(0, 0, 100, 50, None), (100, 50, 200, 100, -30.0)]),
    # v/1000: 100/1000*200 = 20, 200/1000*100 = 20, 500/1000*200 = 100, 600/1000*100 = 60.
    ('vhm', '[100, 200, 500, 600]', (200, 100), [(20, 20, 100, 60)]),
    # 0.12*200 = 24, 0.30*100 = 30, 0.55*200 = 110, 0.80*100 = 80.
    ('lhrs', 'It is at [0.12, 0.30, 0.55, 0.80].', (200, 100), [(24, 30, 110, 80)]),
    # 999x1998 image: x = v/999*999 = v, y = v/999*1998 = 2v.
    ('deepseek_vl2', '<|ref|>car<|/ref|><|det|>[[111, 222, 333, 999]]<|/det|>', (999, 1998),
     [(111, 444, 333, 1998)]),
    ('deepseek_vl2', '<|det|>[[0, 0, 333, 333], [666, 666, 999, 999]]<|/det|>', (999, 999),
     [(0, 0, 333, 333), (666, 666, 999, 999)]),
    # y-first, /1024 on a 2048x1024 image: y1 = 256, x1 = 512*2 = 1024, y2 = 768, x2 = 1000*2.
    ('paligemma', '<loc0256><loc0512><loc0768><loc1000> car', (2048, 1024),
     [(1024, 256, 2000, 768)]),
])
def test_parse_hand_values(dialect, text, size, want):
  got = boxes.parse(dialect, text, *size)
  _close(got, [w if len(w) > 4 else w + (None,) for w in want])


def test_pad_to_square_undone():
  # 200x100 image padded to a 200x200 square: 50 px of padding above and below (offset_y = 50).
  # {<10><30><50><60>}: x1 = 0.10*200 - 0 = 20, y1 = 0.30*200 - 50 = 10,
  #                     x2 = 0.50*200 - 0 = 100, y2 = 0.60*200 - 50 = 70.
  got = boxes.parse('geochat', '{<10><30><50><60>}', 200, 100, pad_to_square=True)
  _close(got, [(20, 10, 100, 70, None)])
  # Portrait 100x200: padded left/right by 50 (offset_x = 50).
  # x1 = 0.30*200 - 50 = 10, y1 = 0.10*200 = 20, x2 = 0.60*200 - 50 = 70, y2 = 0.50*200 = 100.
  got = boxes.parse('geochat', '{<30><10><60><50>}', 100, 200, pad_to_square=True)
  _close(got, [(10, 20, 70, 100, None)])
  # The same box in VHM: 300/1000*200 - 50 = 10, ... and in PaliGemma (y-first, /1024) on a
  # 1024x512 image (offset_y = 256): y1 = 384/1024*1024 - 256 = 128, x1 = 100, y2 = 768 - 256 = 512.
  _close(boxes.parse('vhm', '[300, 100, 600, 500]', 100, 200, pad_to_square=True),
         [(10, 20, 70, 100, None)])
  _close(boxes.parse('paligemma', '<loc0384><loc0100><loc0768><loc0200>', 1024, 512,
                     pad_to_square=True), [(100, 128, 200, 512, None)])
  # The padding itself is clipped away: the whole square is the whole image.
  _close(boxes.parse('geochat', '{<0><0><100><100>}', 200, 100, pad_to_square=True),
         [(0, 0, 200, 100, None)])


def test_format_hand_values():
  b = Box(20, 20, 100, 60)
  assert boxes.format('geochat', b, 200, 100) == '{<10><20><50><60>}'
  assert boxes.format('geochat', Box(20, 20, 100, 60, 45.0), 200, 100) == '{<10><20><50><60>|<45>}'
  assert boxes.format('vhm', b, 200, 100) == '[100, 200, 500, 600]'
  assert boxes.format('lhrs', b, 200, 100) == '[0.10, 0.20, 0.50, 0.60]'
  assert boxes.format('deepseek_vl2', Box(111, 444, 333, 1998), 999, 1998) == (
      '<|det|>[[111, 222, 333, 999]]<|/det|>')
  assert boxes.format('paligemma', Box(1024, 256, 2000, 768), 2048, 1024) == (
      '<loc0256><loc0512><loc0768><loc1000>')
  # Full-image box: PaliGemma's last bin is 1023.
  assert boxes.format('paligemma', Box(0, 0, 10, 10), 10, 10) == (
      '<loc0000><loc0000><loc1023><loc1023>')
  assert boxes.format('geochat', Box(20, 10, 100, 70), 200, 100, pad_to_square=True) == (
      '{<10><30><50><60>}')


@pytest.mark.parametrize('dialect', sorted(boxes.DIALECTS))
@pytest.mark.parametrize('pad', [False, True])
def test_round_trip_within_one_step(dialect, pad):
  rng = random.Random(0)
  d = boxes.DIALECTS[dialect]
  for width, height in [(200, 100), (100, 200), (640, 640), (1333, 517)]:
    side_x, side_y = (max(width, height),) * 2 if pad else (width, height)
    for _ in range(50):
      x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
      y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
      angle = float(rng.randint(-90, 90)) if dialect == 'geochat' else None
      box = Box(x1, y1, x2, y2, angle)
      text = boxes.format(dialect, box, width, height, pad_to_square=pad)
      (back,) = boxes.parse(dialect, text, width, height, pad_to_square=pad)
      eps = 1e-9
      assert abs(back.x1 - x1) <= d.step * side_x + eps and abs(back.x2 - x2) <= d.step * side_x + eps
      assert abs(back.y1 - y1) <= d.step * side_y + eps and abs(back.y2 - y2) <= d.step * side_y + eps
      assert back.angle == angle, text


def test_several_boxes_round_trip():
  bs = [Box(0, 0, 100, 50), Box(100, 50, 200, 100, 30.0)]
  for dialect in boxes.DIALECTS:
    text = boxes.format(dialect, bs, 200, 100)
    back = boxes.parse(dialect, text, 200, 100)
    assert len(back) == 2, (dialect, text)


@pytest.mark.parametrize('dialect,text', [
    ('geochat', 'there is no box here'),
    ('geochat', '{<10><20><5><60>}'),          # x2 < x1
    ('geochat', '{<10><70><50><60>}'),         # y2 < y1
    ('geochat', '{<10><20><150><60>}'),        # > 100
    ('geochat', '{<-5><20><50><60>}'),         # < 0
    ('vhm', '[1, 2, 3]'),                      # three numbers
    ('vhm', '[100, 200, 1500, 600]'),
    ('lhrs', '[12, 30, 55, 80]'),              # not 0-1
    ('deepseek_vl2', '[[1, 2, 3, 4]]'),        # no <|det|> block
    ('deepseek_vl2', '<|det|>[[0, 0, 1000, 10]]<|/det|>'),
    ('paligemma', '<loc0100><loc0200><loc0300>'),
    ('paligemma', '<loc0100><loc0200><loc1024><loc0300>'),
    ('paligemma', '<loc0500><loc0200><loc0300><loc0300>'),  # y2 < y1 (y-first)
])
def test_malformed_boxes(dialect, text):
  with pytest.raises(boxes.BoxParseError) as err:
    boxes.parse(dialect, text, 200, 100)
  assert dialect in str(err.value) and repr(text) in str(err.value)
  assert isinstance(err.value, ValueError)
  assert boxes.try_parse(dialect, text, 200, 100) is None


def test_coordinate_pieces_are_what_format_writes():
  geochat = boxes.coordinate_pieces('geochat')
  assert geochat[:3] == ['<0>', '<1>', '<2>'] and geochat[-1] == '<100>' and len(geochat) == 101
  paligemma = boxes.coordinate_pieces('paligemma')
  assert paligemma[0] == '<loc0000>' and paligemma[-1] == '<loc1023>' and len(paligemma) == 1024
  for name, pieces in (('geochat', geochat), ('paligemma', paligemma)):
    text = boxes.format(name, Box(3.0, 50.0, 97.0, 200.0), 100, 200)
    written = re.findall(r'<[^<>|]+>', text)
    assert len(written) == 4 and set(written) <= set(pieces), (name, text)
  with pytest.raises(ValueError, match="'lhrs' writes its values inside a list"):
    boxes.coordinate_pieces('lhrs')


def test_unknown_dialect():
  with pytest.raises(KeyError, match='nope'):
    boxes.parse('nope', '[1, 2, 3, 4]', 10, 10)


def test_iou():
  a = Box(0, 0, 10, 10)
  assert boxes.iou(a, a) == 1.0
  assert boxes.iou(a, Box(20, 20, 30, 30)) == 0.0
  assert boxes.iou(a, Box(10, 0, 20, 10)) == 0.0  # touching edges
  # Overlap [5,10]x[5,10] = 25; union 100 + 100 - 25 = 175.
  assert boxes.iou(a, Box(5, 5, 15, 15)) == pytest.approx(25 / 175)
  # Angles are ignored.
  assert boxes.iou(a, Box(0, 0, 10, 10, angle=30.0)) == 1.0
  assert boxes.iou(Box(1, 1, 1, 1), Box(1, 1, 1, 1)) == 0.0  # degenerate


# ---------------------------------------------------------------------------- task tags

@pytest.mark.parametrize('tag,task,granularity', [
    ('[grounding]', 'grounding', 'local'),
    ('[refer]', 'grounding', 'local'),
    ('[identify]', 'vqa', 'local'),
    ('{CLS}', 'scene_classification', 'global'),
    ('{VQA}', 'vqa', 'mixed'),
    ('{VG}', 'grounding', 'local'),
    ('{IDK}', 'vqa', 'mixed'),
    ('{IT}', 'scene_classification', 'global'),
    ('[VG]', 'grounding', 'local'),
    ('[CLS]', 'scene_classification', 'global'),
    ('[VQA]', 'vqa', 'mixed'),
    ('[Identify]', 'vqa', 'local'),
])
def test_every_tag(tag, task, granularity):
  prompt = f'<image>\n{tag} what is here?'
  assert tasks.classify(prompt) == (TASKS.index(task), GRANULARITIES.index(granularity), tag)
  assert tasks.strip_tag(prompt) == '<image>\nwhat is here?'
  assert tasks.classify(f'{tag} what is here?')[2] == tag  # no image line


def test_all_spec_tags_registered():
  assert set(tasks.TAGS) == {'[grounding]', '[refer]', '[identify]', '{CLS}', '{VQA}', '{VG}',
                             '{IDK}', '{IT}', '[VG]', '[CLS]', '[VQA]', '[Identify]'}


@pytest.mark.parametrize('prompt,task,granularity', [
    ('<image>\nHow many planes are parked?', 'counting', 'local'),
    ('<image>\nWhat is the number of ships?', 'counting', 'local'),
    ('<image>\nGive the bounding box of the red car.', 'grounding', 'local'),
    ('<image>\nWhere is the stadium?', 'grounding', 'local'),
    ('<image>\nDescribe the image in detail.', 'captioning', 'global'),
    ('<image>\nClassify the image.', 'scene_classification', 'global'),
    ('<image>\nWhat type of scene is this?', 'scene_classification', 'global'),
    ('<image>\nWhat color is the roof {<10><20><50><60>}?', 'vqa', 'local'),
    ('<image>\nIs it a rural or an urban area?', 'vqa', 'mixed'),
    ('Is there a road?', 'vqa', 'mixed'),
])
def test_untagged_keywords(prompt, task, granularity):
  assert tasks.classify(prompt) == (TASKS.index(task), GRANULARITIES.index(granularity), None)
  assert tasks.strip_tag(prompt) == prompt


def test_tag_not_at_start_is_not_a_tag():
  prompt = '<image>\nWhat does [refer] mean?'
  assert tasks.classify(prompt)[2] is None
  assert tasks.strip_tag(prompt) == prompt


def test_unknown_tag_raises():
  with pytest.raises(tasks.UnknownTagError, match=r'\[detect\]'):
    tasks.classify('<image>\n[detect] the planes')
  with pytest.raises(tasks.UnknownTagError, match=r'\{FOO\}'):
    tasks.strip_tag('{FOO} hello')
  # A box at the start is not a tag.
  assert tasks.classify('{<10><20><50><60>} what is this?')[2] is None


def test_tag_case_insensitive_fallback():
  assert tasks.classify('[Grounding] the plane')[:2] == (TASKS.index('grounding'),
                                                         GRANULARITIES.index('local'))


# ---------------------------------------------------------------------------- template

SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. The assistant '
          "gives helpful, detailed, and polite answers to the user's questions.")


def test_render_two_turns():
  conv = [
      {'from': 'human', 'value': '<image>\n[refer] Where is the plane?'},
      {'from': 'gpt', 'value': '{<10><20><50><60>}'},
      {'from': 'human', 'value': 'How many ships?'},
      {'from': 'bot', 'value': '3'},
  ]
  pieces = tmpl.render(tmpl.get_template('llava_v1'), conv)
  want = (SYSTEM + ' USER: <image>\n[refer] Where is the plane? ASSISTANT: '
          '{<10><20><50><60>}</s>USER: How many ships? ASSISTANT: 3</s>')
  assert ''.join(text for text, _ in pieces) == want
  assert tmpl.render_text(tmpl.LLAVA_V1, conv) == want
  assert [text for text, is_answer in pieces if is_answer] == ['{<10><20><50><60>}</s>', '3</s>']
  assert pieces == [
      (SYSTEM + ' USER: <image>\n[refer] Where is the plane? ASSISTANT: ', False),
      ('{<10><20><50><60>}</s>', True),
      ('USER: How many ships? ASSISTANT: ', False),
      ('3</s>', True),
  ]


def test_render_generation_prompt():
  pieces = tmpl.render(tmpl.LLAVA_V1, [{'from': 'human', 'value': '<image>\nHi'}])
  assert pieces == [(SYSTEM + ' USER: <image>\nHi ASSISTANT:', False)]


def test_template_hash():
  h = tmpl.template_hash(tmpl.LLAVA_V1)
  assert len(h) == 12 and all(c in '0123456789abcdef' for c in h)
  import dataclasses  # pylint: disable=import-outside-toplevel
  assert tmpl.template_hash(dataclasses.replace(tmpl.LLAVA_V1)) == h  # equal fields, equal hash
  assert tmpl.template_hash(tmpl.get_template('geochat')) == h
  changed = dataclasses.replace(tmpl.LLAVA_V1, system=tmpl.LLAVA_V1.system + ' ')
  assert tmpl.template_hash(changed) != h
  assert tmpl.LLAVA_V1.system == SYSTEM


@pytest.mark.parametrize('conv,index', [
    ([], 0),
    ([{'from': 'gpt', 'value': 'hi'}], 0),
    ([{'from': 'human', 'value': 'a'}, {'from': 'human', 'value': 'b'}], 1),
    ([{'from': 'human', 'value': 'a'}, {'from': 'gpt', 'value': 'b'},
      {'from': 'gpt', 'value': 'c'}], 2),
    ([{'from': 'human', 'value': 'a'}, {'from': 'robot', 'value': 'b'}], 1),
    ([{'from': 'human', 'value': 'a'}, {'value': 'b'}], 1),
    ([{'from': 'human', 'value': None}], 0),
])
def test_malformed_conversations(conv, index):
  with pytest.raises(tmpl.ConversationError, match=rf'turn {index}\b'):
    tmpl.render(tmpl.LLAVA_V1, conv)


def test_unknown_template():
  with pytest.raises(KeyError, match='nope'):
    tmpl.get_template('nope')
