"""python -m skymoe_jax.demo --workdir=DIR [--port=7860] [--host=127.0.0.1] [--examples=FOLDER]

A web page for one trained workdir (Gradio): upload or pick an image, ask a question (a task tag
such as `[refer]` is optional: without one the question's keywords choose the task, as in
training), and see the answer, the boxes it names drawn on the image, the task and granularity
the router was given and the expert load of each MoE layer for that question. The answers are
the chat command's (evaluation/chat.py, the same engine); it runs on CPU.

The examples to pick from are the held-out scenes the recipe leaves in its workdir
(--examples: a folder holding questions.jsonl and its images; default WORKDIR/../examples, the
recipe's layout, when it exists). The page is served on --host only (default localhost), never
shared, with Gradio's analytics off: it reaches nothing outside this machine.
"""
import os
import pathlib
from typing import Dict, Optional, Sequence

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # before gradio is imported

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from skymoe_jax import cli  # noqa: E402
from skymoe_jax import storage  # noqa: E402
from skymoe_jax.data import image_ops, tasks  # noqa: E402
from skymoe_jax.evaluation import chat  # noqa: E402

BOX_COLOR = (255, 0, 255)  # magenta: no synthetic palette colour, visible on every scene
MIN_SIDE = 384             # small images are enlarged (nearest pixel) to at least this side
API_NAME = 'answer'        # the endpoint gradio_client calls: client.predict(..., api_name='/answer')


def define_flags():
  cli.define_workdir_flag('A training workdir (its config.json, tokenizer.model, checkpoints).')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to serve on (0.0.0.0: every interface).')
  flags.DEFINE_integer('port', 7860, 'Port to serve on.')
  flags.DEFINE_string('examples', None, 'Folder of example images and their questions.jsonl '
                      '(the recipe writes WORKDIR/examples); default WORKDIR/../examples if it '
                      'exists.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Longest answer.')


def draw_boxes(image: np.ndarray, boxes: Sequence, min_side: int = MIN_SIDE) -> np.ndarray:
  """`image` (uint8 [H, W, 3]) enlarged by a whole factor until its short side is at least
  `min_side`, with each box's outline drawn in BOX_COLOR.

  Boxes are pixel edges of the original image (x2, y2 exclusive, as boxes.Box): box (x1, y1,
  x2, y2) outlines enlarged pixels x1..x2-1, y1..y2-1 from their outer edges inwards.
  """
  h, w = image.shape[:2]
  scale = max(1, -(-min_side // min(h, w)))
  canvas = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
  draw = ImageDraw.Draw(canvas)
  width = max(2, scale // 2)
  for b in boxes:
    x1, y1 = round(b.x1 * scale), round(b.y1 * scale)
    x2, y2 = round(b.x2 * scale) - 1, round(b.y2 * scale) - 1
    if x2 >= x1 and y2 >= y1:
      draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOR, width=width)
  return np.asarray(canvas)


def load_table(routing: Optional[Dict]) -> Dict:
  """The expert load per MoE layer as a table: {'headers': [...], 'data': [[layer, load, ...]]}
  (one row per MoE layer, each expert's share of the question's routed tokens)."""
  if routing is None:
    return {'headers': ['layer', 'expert load'], 'data': [['dense model: no MoE layers', '']]}
  headers = ['layer'] + [f'expert {e}' for e in range(routing['num_experts'])]
  data = [[name] + [round(v, 3) for v in layer['load']]
          for name, layer in routing['layers'].items()]
  return {'headers': headers, 'data': data}


def respond(bot: chat.Chat, image_path: Optional[str], question: str):
  """The page's answer to one submission: (answer, image with boxes, router details, expert
  load table). A missing or bad input is a gradio Error shown on the page."""
  import gradio as gr  # pylint: disable=import-outside-toplevel
  if not image_path:
    raise gr.Error('Upload or pick an image first.')
  if not question or not question.strip():
    raise gr.Error('Type a question about the image.')
  try:
    image_bytes = chat.read_image(image_path)
    reply = bot.ask(image_bytes, question)
  except (chat.ImageError, tasks.UnknownTagError, ValueError) as e:
    raise gr.Error(str(e)) from None
  details = {'task': reply.task, 'granularity': reply.granularity, 'tag': reply.tag,
             'boxes': [[b.x1, b.y1, b.x2, b.y2] for b in reply.boxes],
             'image_size': [reply.width, reply.height], 'step': bot.step}
  if reply.routing is not None:
    details['token_drop_rate'] = reply.routing['token_drop_rate']
  drawn = draw_boxes(image_ops.decode(image_bytes), reply.boxes)
  return reply.answer, drawn, details, load_table(reply.routing)


def default_examples_dir(workdir) -> Optional[pathlib.Path]:
  """The recipe's examples beside the stage workdirs (WORKDIR/../examples), if there are any."""
  folder = storage.resolve(workdir).parent / chat.EXAMPLES_DIR  # gs://b/run -> gs://b/examples
  return folder if (folder / chat.QUESTIONS_FILE).is_file() else None


def build_app(bot: chat.Chat, examples: Sequence[Sequence[str]] = ()):
  """The demo page (a gradio.Blocks) answering with `bot`; `examples`: [[image path, question]]."""
  import gradio as gr  # pylint: disable=import-outside-toplevel
  with gr.Blocks(title='SkyMoE demo', analytics_enabled=False) as page:
    gr.Markdown(f'## SkyMoE: ask about an aerial image\nCheckpoint step {bot.step}. Optional '
                'task tags: `[refer]` / `[grounding]` (boxes), `[identify]`, `{CLS}`, `{VQA}`; '
                'without one, the question\'s keywords choose the task.')
    with gr.Row():
      with gr.Column():
        image = gr.Image(label='image', type='filepath', image_mode=None,
                         sources=['upload', 'clipboard'], height=320, elem_id='image-in')
        question = gr.Textbox(label='question', placeholder='[refer] Where is the red ship?',
                              elem_id='question')
        ask = gr.Button('Ask', variant='primary', elem_id='ask')
      with gr.Column():
        answer = gr.Textbox(label='answer', interactive=False, elem_id='answer')
        drawn = gr.Image(label='boxes named in the answer', type='numpy', format='png',
                         interactive=False, height=384, elem_id='image-out')
        details = gr.JSON(label='router: task and granularity; boxes (pixels)',
                          elem_id='details')
    load = gr.Dataframe(label='expert load per MoE layer (share of this question\'s routed '
                        'tokens)', interactive=False, elem_id='load')
    if examples:
      gr.Examples(examples=[list(e) for e in examples], inputs=[image, question],
                  label='held-out scenes', examples_per_page=12)
    gr.on(triggers=[ask.click, question.submit], fn=lambda i, q: respond(bot, i, q),
          inputs=[image, question], outputs=[answer, drawn, details, load], api_name=API_NAME)
  return page


def launch(page, host: str, port: int, block: bool):
  """Serves `page` on host:port, local only (no share link, no server-side rendering)."""
  return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                     mcp_server=False, prevent_thread_lock=not block, show_error=True,
                     quiet=not block)


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  f = flags.FLAGS
  examples_dir = f.examples or default_examples_dir(f.workdir)
  if f.examples and not (storage.path(f.examples) / chat.QUESTIONS_FILE).is_file():
    raise app.UsageError(f'--examples={f.examples}: no {chat.QUESTIONS_FILE} there')
  try:
    examples = ([[str(r['image']), r['question']] for r in chat.read_examples(examples_dir)]
                if examples_dir else [])
  except ValueError as e:
    raise app.UsageError(f'--examples: {e}') from None
  if not examples:
    logging.info('no examples (no %s beside %s): upload an image', chat.EXAMPLES_DIR, f.workdir)
  bot = chat.Chat(f.workdir, f.step, f.max_new_tokens)
  logging.info('serving %s (step %d) on http://%s:%d', f.workdir, bot.step, f.host, f.port)
  launch(build_app(bot, examples), f.host, f.port, block=True)


if __name__ == '__main__':
  cli.run(main, define_flags)
