"""Chat with a Mary-MLLM checkpoint: a Gradio web demo, or a terminal chat with --cli.

    python gradio_vlm.py                                  # the main job's checkpoint, http://127.0.0.1:7860
    python gradio_vlm.py --model_path checkpoints/sft --device cuda --dtype bf16
    python gradio_vlm.py --cli assets/examples/shapes_1.png

Attach an image to a message to start a conversation about it; follow-up questions reuse it (it is encoded once and
the KV cache carries over). A message without any image asks the model text-only. Answers stream as they are
generated; one generation runs at a time and every browser session keeps its own conversation.
"""

from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
# The real recipe's checkpoints (scripts/*.sh), then the main job's (pretrained parts, then --preset tiny).
MAIN_JOB_CHECKPOINTS = ["checkpoints/dpo", "checkpoints/sft", "checkpoints/mini/dpo", "checkpoints/mini/sft",
                        "checkpoints/tiny/dpo", "checkpoints/tiny/sft"]
EXAMPLES = os.path.join(ROOT, "assets", "examples")
# The main job's held-out questions (scripts/quickstart.py's data), offered as examples for the model it trained.
MAIN_JOB_OUTPUTS = ["checkpoints/mini", "checkpoints/tiny"]
MAIN_JOB_QUESTIONS = os.path.join(ROOT, "datasets", "shapes", "eval.jsonl")
MAX_PIXELS = 40_000_000  # bigger uploads are refused with a message: decoding them could exhaust memory


def resolve_model_path(model_path: str | None) -> str:
    if model_path:
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise SystemExit(f"{model_path} is not a checkpoint folder (no config.json)")
        return model_path
    for candidate in MAIN_JOB_CHECKPOINTS:
        if os.path.isfile(os.path.join(ROOT, candidate, "config.json")):
            return os.path.join(ROOT, candidate)
    raise SystemExit("no checkpoint to chat with: run `bash scripts/quickstart.sh` to train the main job's model "
                     "(it writes checkpoints/mini/), or pass --model_path FOLDER")


def load_model(args):
    from inference import describe_precision, load_for_inference

    model = load_for_inference(resolve_model_path(args.model_path), args.device, args.dtype, args.max_tiles)
    print(f"loaded {model.name_or_path} on {model.device}; precision: "
          f"{describe_precision(args.dtype, model.device, how='weights')}")
    return model


def open_upload(path: str):
    """The uploaded file as an RGB image, or a ValueError whose message the chat shows."""
    from PIL import Image

    from processor import DataError, open_image

    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Exception:
        raise ValueError(f"{os.path.basename(path)} is not an image I can read (PNG, JPEG, WebP, ...)") from None
    if width * height > MAX_PIXELS:
        raise ValueError(f"{os.path.basename(path)} is {width}x{height} pixels; the limit is "
                         f"{MAX_PIXELS // 1_000_000} megapixels. Please upload a smaller image.")
    try:
        return open_image(path, None, os.path.basename(path))
    except DataError as error:
        raise ValueError(str(error)) from None


def example_questions(model_path: str, questions_file: str = MAIN_JOB_QUESTIONS, count: int = 4,
                      main_job_outputs=None) -> list[tuple[str, str]]:
    """(image, question) pairs to click. For a model the main job trained (a folder under its outputs) whose held-out
    scenes are on disk: `count` of them, one English question each, the question types in turn. Otherwise the
    shipped shape pictures with three questions."""
    from eval_vlm import one_question_per_scene, read_questions

    outputs = [os.path.join(ROOT, folder) for folder in (main_job_outputs or MAIN_JOB_OUTPUTS)]
    model_path = os.path.abspath(model_path)
    if os.path.isfile(questions_file) and any(model_path.startswith(folder + os.sep) for folder in outputs):
        image_dir = os.path.join(os.path.dirname(questions_file), "images")
        rows = [row for row in read_questions(questions_file)
                if row.get("lang", "en") == "en" and os.path.isfile(os.path.join(image_dir, row["image"]))]
        picked = [(os.path.join(image_dir, row["image"]), row["question"])
                  for row in one_question_per_scene(rows, count)]
        if picked:
            return picked
    shipped = sorted(os.listdir(EXAMPLES)) if os.path.isdir(EXAMPLES) else []
    return [(os.path.join(EXAMPLES, name), question) for name, question in zip(
        shipped, ["How many shapes are there?", "What colour is the circle?", "Is there a red square?"])]


def generation_settings(max_new_tokens, do_sample, temperature, top_p) -> dict:
    settings = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
    if do_sample:
        settings.update(temperature=float(temperature), top_p=float(top_p))
    return settings


def build_demo(model, examples: list[tuple[str, str]] | None = None):
    import gradio as gr

    from conversation import ChatSession

    def respond(message, session, history, system_prompt, max_new_tokens, do_sample, temperature, top_p):
        """Streams (shown chat, session, history, cleared textbox) for one user message. The conversation lives
        in per-browser-session state on the server, so API clients send only the message and the settings."""
        message = message or {}
        text, files = (message.get("text") or "").strip(), message.get("files") or []
        history = list(history or [])
        if files:
            try:
                image = open_upload(files[-1])
            except ValueError as error:
                history += [{"role": "user", "content": os.path.basename(files[-1])},
                            {"role": "assistant", "content": f"⚠️ {error}"}]
                yield history, session, history, None
                return
            # A new image starts a new conversation.
            session = ChatSession(model, image, system_prompt or None)
            history = [{"role": "user", "content": {"path": files[-1]}}]
        if not text:
            history.append({"role": "assistant", "content": "⚠️ Please type a question" +
                            (" about the image." if files else ".")})
            yield history, session, history, None
            return
        if session is None:
            session = ChatSession(model, None, system_prompt or None)
        session.system_prompt = system_prompt or None
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        settings = generation_settings(max_new_tokens, do_sample, temperature, top_p)
        try:
            for piece in session.stream(text, **settings):
                history[-1]["content"] += piece
                yield history, session, history, None
        except Exception as error:  # the app keeps serving; the user sees what went wrong
            history[-1]["content"] = f"⚠️ generation failed: {error}"
        if not history[-1]["content"].strip():
            history[-1]["content"] = "(empty answer)"
        yield history, session, history, None

    examples = example_questions(model.name_or_path) if examples is None else examples
    with gr.Blocks(title="Mary-MLLM") as demo:
        gr.Markdown("## Mary-MLLM\nAttach an image and ask about it; follow-up questions keep the image. "
                    "A new image starts a new conversation.")
        session, shown = gr.State(None), gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="conversation", height=460)
                box = gr.MultimodalTextbox(placeholder="Ask about an image…", file_count="single",
                                           show_label=False, sources=["upload"])
                clear = gr.Button("Clear")
            with gr.Column(scale=1):
                with gr.Accordion("Settings", open=True):
                    system_prompt = gr.Textbox(value=model.config.system_prompt, label="system prompt", lines=2)
                    max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
                    do_sample = gr.Checkbox(value=False, label="sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
        if examples:
            gr.Examples([[{"text": question, "files": [path]}] for path, question in examples], inputs=[box],
                        label="examples: click one, then send it")
        box.submit(respond, [box, session, shown, system_prompt, max_new_tokens, do_sample, temperature, top_p],
                   [chatbot, session, shown, box], api_name="chat")
        clear.click(lambda: ([], None, [], None), None, [chatbot, session, shown, box], api_name="clear")
    # One generation at a time: sessions never interleave on the model; the others wait in the queue.
    return demo.queue(default_concurrency_limit=1)


def run_cli(model, image_path: str | None, settings: dict) -> None:
    """A terminal chat: type questions; '/image PATH' switches image, '/clear' forgets, Ctrl-D quits."""
    from conversation import ChatSession

    def new_session(path):
        try:
            return ChatSession(model, open_upload(path) if path else None)
        except ValueError as error:
            print(f"⚠️ {error}")
            return ChatSession(model, None)

    session = new_session(image_path)
    print("type a question ('/image PATH' for another image, '/clear' to start over, Ctrl-D to quit)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line.startswith("/image"):
            session = new_session(line[len("/image"):].strip())
            continue
        if line == "/clear":
            session = ChatSession(model, session.image)
            continue
        if not line:
            print("⚠️ please type a question")
            continue
        print("model> ", end="", flush=True)
        for piece in session.stream(line, **settings):
            print(piece, end="", flush=True)
        print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="a VLM checkpoint folder (default: the first found of "
                             + ", ".join(MAIN_JOB_CHECKPOINTS) + ")")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    parser.add_argument("--max_tiles", type=int, default=None,
                        help="dynamic resolution: tiles per image plus a global view (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights' dtype; auto: bf16 on GPUs that have it (else fp16), on a CPU bf16 where it "
                             "measures clearly faster than fp32")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--cli", nargs="?", const="", default=None, metavar="IMAGE",
                        help="chat in the terminal instead, optionally about IMAGE")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in the terminal chat")
    args = parser.parse_args(argv)

    model = load_model(args)
    if args.cli is not None:
        run_cli(model, args.cli or None, {"max_new_tokens": args.max_new_tokens})
        return
    build_demo(model).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
