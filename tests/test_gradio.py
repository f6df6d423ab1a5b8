"""The chat demo as its users meet it: a real server on a free localhost port, driven by gradio_client and by a
headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, draw_image

from model import VLM

gradio_client = pytest.importorskip("gradio_client")
SETTINGS = ("You are a helpful assistant.", 12, False, 0.7, 0.9)  # system prompt, max tokens, greedy, T, top-p
SCREENSHOT = os.path.join(ROOT, "tests", ".artifacts", "gradio_chat.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_checkpoint):
    model_path, image_dir = trained_checkpoint
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "gradio_vlm.py"), "--model_path", model_path,
                                "--port", str(port), "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.5)
    yield url, model_path, image_dir
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def model(trained_checkpoint):
    return VLM.from_pretrained(trained_checkpoint[0]).eval()


def ask(client, question, image=None):
    files = [gradio_client.handle_file(image)] if image else []
    history, _ = client.predict({"text": question, "files": files}, *SETTINGS, api_name="/chat")
    return history[-1]["content"][0]["text"]


def first_image(image_dir, n=0):
    return os.path.join(image_dir, sorted(os.listdir(image_dir))[n])


def test_answers_match_model_chat_and_second_turn_sees_the_first(server, model):
    url, _, image_dir = server
    image = first_image(image_dir)
    client = gradio_client.Client(url, verbose=False)
    first = ask(client, "How many shapes are there?", image)
    expected = model.chat(image, "How many shapes are there?", max_new_tokens=12)
    assert expected and first == expected
    second = ask(client, "What colour is the square?")
    assert second == model.chat(image, "What colour is the square?", max_new_tokens=12,
                                history=[("How many shapes are there?", first)])


def test_bad_input_gets_a_message_and_the_app_keeps_serving(server, tmp_path):
    url, _, image_dir = server
    client = gradio_client.Client(url, verbose=False)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a picture")
    assert "notes.txt is not an image" in ask(client, "What is this?", str(not_image))
    assert "Please type a question" in ask(client, "", first_image(image_dir))
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)
    assert "the limit is 40 megapixels" in ask(client, "What is this?", str(huge))
    assert ask(client, "How many shapes are there?", first_image(image_dir))  # still serving


def test_two_concurrent_clients_each_get_their_own_answers(server, model):
    url, _, image_dir = server
    jobs = [(first_image(image_dir, 1), "How many shapes are there?"),
            (first_image(image_dir, 2), "What colour is the circle?")]

    def conversation(job):
        image, question = job
        return ask(gradio_client.Client(url, verbose=False), question, image)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(conversation, jobs))
    assert answers == [model.chat(image, question, max_new_tokens=12) for image, question in jobs]


def chromium_path():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no chromium: install Debian's chromium (apt-get install chromium) for the browser test")
    pytest.importorskip("playwright", reason="pip install playwright (no browser download needed)")
    return found


def test_real_browser_uploads_asks_and_sees_the_streamed_answer(server, model, tmp_path):
    browser_path = chromium_path()
    from playwright.sync_api import sync_playwright

    url, _, image_dir = server
    image = tmp_path / "scene.png"
    draw_image(str(image), 3, size=64)
    expected = model.chat(str(image), "How many shapes are there?", max_new_tokens=64)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(image))
        textbox = page.get_by_placeholder("Ask about an image…")
        textbox.fill("How many shapes are there?")
        page.wait_for_timeout(500)  # let the upload register before submitting
        textbox.press("Enter")
        bot = page.locator(".message.bot, [data-testid='bot']").last
        bot.wait_for(timeout=60_000)
        page.wait_for_function("expected => document.body.innerText.includes(expected)", arg=expected,
                               timeout=60_000)
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        page.screenshot(path=SCREENSHOT, full_page=True)
        text = page.inner_text("body")
        browser.close()
    assert "How many shapes are there?" in text and expected in text


def test_terminal_chat_answers_like_model_chat(trained_checkpoint, model):
    model_path, image_dir = trained_checkpoint
    image = first_image(image_dir)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gradio_vlm.py"), "--model_path", model_path,
                             "--cli", image, "--max_new_tokens", "12", "--dtype", "fp32"],
                            input="How many shapes are there?\n\n/image /nowhere.png\n", capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = model.chat(image, "How many shapes are there?", max_new_tokens=12)
    assert f"model> {expected}" in result.stdout
    assert "please type a question" in result.stdout and "nowhere.png is not an image" in result.stdout


def test_without_a_checkpoint_it_names_the_command_that_makes_one(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gradio_vlm.py"), "--model_path", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not a checkpoint folder" in result.stderr
    import gradio_vlm

    missing = [os.path.join(str(tmp_path), "nothing")]
    original, gradio_vlm.MAIN_JOB_CHECKPOINTS = gradio_vlm.MAIN_JOB_CHECKPOINTS, missing
    try:
        with pytest.raises(SystemExit, match="bash scripts/quickstart.sh"):
            gradio_vlm.resolve_model_path(None)
    finally:
        gradio_vlm.MAIN_JOB_CHECKPOINTS = original


def test_the_main_jobs_model_is_offered_its_held_out_scenes_as_examples(tmp_path):
    """A model the main job trained gets held-out scenes to click, one English question each, the types in turn;
    any other model gets the shipped pictures."""
    import json

    import gradio_vlm

    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        draw_image(str(tmp_path / "images" / f"{i}.png"), i)
        for kind in ("colour", "count"):
            rows.append({"image": f"{i}.png", "question": f"{kind} {i}?", "answer": "x", "type": kind,
                         "lang": "zh" if i == 0 else "en"})
    questions = tmp_path / "eval.jsonl"
    questions.write_text("\n".join(map(json.dumps, rows)))
    outputs = [str(tmp_path / "mini")]
    picked = gradio_vlm.example_questions(str(tmp_path / "mini" / "dpo"), str(questions), 4, outputs)
    assert picked == [(str(tmp_path / "images" / f"{i}.png"), q) for i, q in
                      [(1, "colour 1?"), (2, "count 2?"), (3, "colour 3?"), (4, "count 4?")]]
    shipped = gradio_vlm.example_questions(str(tmp_path / "elsewhere"), str(questions), 4, outputs)
    assert shipped and all(path.startswith(gradio_vlm.EXAMPLES) for path, _ in shipped)
