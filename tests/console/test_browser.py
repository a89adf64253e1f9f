"""The console in a real browser, as a person uses it: Debian's Chromium (through Playwright) on a
real `pendra serve` with the real Gemma model, installing from a local HTTP catalogue.

The tests run in file order on one server: search, install (two at once, watched to the end), a
failure, a cancel after a reload, chat, embeddings, the overview's live figures, uninstall, and last
a thinking model's reasoning (a tiny random-weight Qwen3.5 dropped into the store). Each
page's devtools console must stay free of errors (a Content-Security-Policy refusal would show
there), and axe-core must find no serious accessibility violation. Screenshots land in
docs/images/console, which the README links to.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pendra_shared.store import ModelStore
from PIL import Image
from playwright.sync_api import expect

from tests.console.conftest import HOSTILE, Console
from tests.support.browser import PageLog, axe_violations, describe_violations, screenshot
from tests.support.hybrids import write_qwen35, write_qwen35_vision

expect.set_options(timeout=30_000)


def open_page(page: Any, console: Console, path: str) -> PageLog:
    log = PageLog()
    log.attach(page)
    page.goto(console.url + path)
    return log


def variant(page: Any, name: str) -> Any:
    return page.locator(f'#catalogue li.variant[data-model="{name}"]')


def installed_row(page: Any, name: str) -> Any:
    return page.locator(f'#installed li.row[data-model="{name}"]')


def to_bytes(text: str) -> float:
    """ "253.1 MB" in bytes; "?" (no public record gives the size) sorts last."""
    if text == "?":
        return float("inf")
    number, unit = text.split()
    return float(number) * 1000 ** ["B", "KB", "MB", "GB", "TB"].index(unit)


def families(page: Any) -> list[str]:
    return page.locator("#catalogue .family h3").all_inner_texts()  # type: ignore[no-any-return]


def test_the_root_opens_the_overview_with_the_server_facts(page: Any, console: Console) -> None:
    log = open_page(page, console, "/")
    expect(page).to_have_url(console.url + "/console/")
    expect(page.locator("#overview")).to_contain_text("Pendra")
    facts = page.locator("#overview")
    expect(facts).to_contain_text("0.1.0")
    expect(facts).to_contain_text("llama-cpp-python")
    expect(facts.locator(".badge").first).to_have_text("cpu")  # no GPU where these tests run
    expect(facts).to_contain_text("None loaded")
    expect(facts).to_contain_text("0 ready")
    log.assert_clean()


def test_the_catalogue_is_searched_and_filtered_by_purpose(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/models")
    expect(page.locator("#catalogue .family").first).to_be_visible()
    # The test catalogue's entries, merged over the bundled ones, as a user's PENDRA_CATALOGUE is.
    assert {"gemma3", "gemma-embed", "broken", "huge"} <= set(families(page))
    # Variants of one family are grouped, smallest first, with their facts.
    gemma = page.locator("#catalogue .family", has=page.locator("h3", has_text=re.compile("^gemma3$")))
    names = gemma.locator("li.variant .variant-name .name").all_inner_texts()
    assert {"gemma3:270m", "gemma3:270m-slow"} <= set(names)
    sizes = [
        to_bytes(t)
        for t in gemma.locator("li.variant .facts div:has(> dt:text-is('Size')) > dd").all_inner_texts()
    ]
    assert len(sizes) == len(names) and sizes == sorted(sizes), sizes
    expect(variant(page, "gemma3:270m")).to_contain_text("Q4_K_M")
    expect(variant(page, "gemma3:270m")).to_contain_text("253.1 MB")
    expect(variant(page, "gemma3:270m")).to_contain_text("32,768 tokens")
    expect(gemma).to_contain_text("License: gemma")
    # Whether each fits the memory this server gives models.
    expect(variant(page, "gemma3:270m").locator(".fit")).to_contain_text("Fits")
    expect(variant(page, "huge:405b").locator(".fit")).to_contain_text("Too big")
    # A description is text, never markup.
    expect(gemma.locator(".description")).to_have_text(HOSTILE)
    assert page.locator("#pwned, #catalogue img, #catalogue b").count() == 0

    page.fill("#q", "embed")
    expect(page.locator("#catalogue .family h3", has_text=re.compile("^gemma3$"))).to_have_count(0)
    assert "gemma-embed" in families(page)
    page.fill("#q", "")
    page.get_by_label("Chat", exact=True).check()
    expect(page.locator("#catalogue .family h3", has_text="gemma-embed")).to_have_count(0)
    assert {"gemma3", "broken", "huge"} <= set(families(page))
    assert set(page.locator("#catalogue .family .badge.purpose").all_inner_texts()) == {"chat"}
    page.get_by_label("Embedding", exact=True).check()
    expect(page.locator("#catalogue .family h3", has_text=re.compile("^gemma3$"))).to_have_count(0)
    assert "gemma-embed" in families(page)
    assert set(page.locator("#catalogue .family .badge.purpose").all_inner_texts()) == {"embedding"}
    page.fill("#q", "no such model anywhere")
    expect(page.locator("#catalogue")).to_contain_text("No model in the catalogue matches")
    log.assert_clean()


def test_two_installs_show_live_progress_until_ready(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/models")
    for name in ("gemma3:270m", "gemma-embed:270m"):
        variant(page, name).get_by_role("button", name="Install").click()
    seen: set[str] = set()
    together = False  # both downloading at the same moment
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        texts = page.locator("#catalogue .job-text").all_inner_texts()
        seen.update(texts)
        together |= sum(t.startswith("Downloading") for t in texts) == 2
        if (
            variant(page, "gemma3:270m").locator(".badge.ok").count()
            and variant(page, "gemma-embed:270m").locator(".badge.ok").count()
        ):
            break
        time.sleep(0.1)
    assert together, f"the two installs never ran at once; saw {sorted(seen)}"
    downloading = [t for t in seen if re.match(r"Downloading · \d+% · [\d.]+ MB of 253\.1 MB", t)]
    assert downloading, f"no live download progress was shown; saw {sorted(seen)}"
    assert any(re.search(r"[\d.]+ [KMG]B/s · .+ left", t) for t in downloading), downloading
    for name in ("gemma3:270m", "gemma-embed:270m"):
        expect(variant(page, name).locator(".badge.ok")).to_have_text("Installed")
        row = installed_row(page, name)
        expect(row.locator(".badge.ok")).to_have_text("Ready")
        expect(row).to_contain_text("Not loaded")
    expect(installed_row(page, "gemma-embed:270m")).to_contain_text("embedding")
    assert (console.store / "gemma3-270m.gguf").is_file()
    assert (console.store / "gemma3-270m.gguf.meta.json").is_file()
    assert (console.store / "gemma-embed-270m.gguf.meta.json").is_file()
    screenshot(page, "models")
    log.assert_clean()


def test_a_failed_install_says_why_in_words_and_offers_a_retry(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/models")
    variant(page, "broken:1b").get_by_role("button", name="Install").click()
    failure = variant(page, "broken:1b").locator(".job-failed")
    expect(failure).to_contain_text("Install failed (checksum_mismatch)")
    expect(failure).to_contain_text("not the one the catalogue pins")
    expect(page.locator("#toast")).to_have_text("Installing broken:1b failed (checksum_mismatch).")
    assert not list(console.store.glob("broken*"))
    # Retry downloads again (and fails the same way: the source still serves the wrong bytes).
    fetched = sum(r.path == "/broken.gguf" for r in console.fast.requests)
    variant(page, "broken:1b").get_by_role("button", name="Retry install").click()
    expect(variant(page, "broken:1b").get_by_role("button", name="Retry install")).to_be_enabled()
    expect(failure).to_contain_text("Install failed (checksum_mismatch)")
    assert sum(r.path == "/broken.gguf" for r in console.fast.requests) == fetched + 1
    log.assert_clean()


DROP_PROGRESS_OF_BROKEN = """
(() => {
  const fetched = window.fetch.bind(window);
  window.fetch = async (input, init) => {
    const response = await fetched(input, init);
    if (!String(input.url || input).includes("/api/jobs/events")) return response;
    let buffer = "";
    const decoder = new TextDecoder();
    const encoder = new TextEncoder();
    const drop = (block) => block.startsWith("event: progress") && block.includes('"model":"broken:1b"');
    const body = response.body.pipeThrough(new TransformStream({
      transform(chunk, out) {
        buffer += decoder.decode(chunk, { stream: true });
        const blocks = buffer.split("\\n\\n");
        buffer = blocks.pop();
        for (const block of blocks) if (!drop(block)) out.enqueue(encoder.encode(block + "\\n\\n"));
      },
    }));
    return new Response(body, { status: response.status, headers: response.headers });
  };
})();
"""


def test_an_install_that_fails_before_its_start_is_answered_is_still_told(
    page: Any, console: Console
) -> None:
    """On a slow machine a checksum failure can reach the page's job stream before the install's
    own POST has answered, and with no progress event before it (the job began and ended between
    two of the stream's looks): the page must still say it failed. The page's fetch is wrapped to
    drop the job's progress events, and the POST's answer is held until the job has failed."""
    page.add_init_script(DROP_PROGRESS_OF_BROKEN)
    log = open_page(page, console, "/console/models")
    ends: list[str] = []

    def answer_late(route: Any) -> None:
        response = route.fetch()
        job = response.json()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = httpx.get(f"{console.url}/api/jobs/{job['id']}", timeout=10).json()["state"]
            if state in ("done", "failed", "cancelled"):
                ends.append(state)
                break
            time.sleep(0.1)
        time.sleep(0.5)  # the stream's word of the end reaches the page first
        route.fulfill(response=response)

    page.route("**/api/models/install", answer_late)
    variant(page, "broken:1b").get_by_role("button", name="Retry install").click()
    expect(page.locator("#toast")).to_have_text("Installing broken:1b failed (checksum_mismatch).")
    assert ends == ["failed"]
    failure = variant(page, "broken:1b").locator(".job-failed")
    expect(failure).to_contain_text("Install failed (checksum_mismatch)")
    page.unroute("**/api/models/install")
    log.assert_clean()


def test_a_reload_reattaches_to_a_running_install_which_can_be_cancelled(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/models")
    row = variant(page, "gemma3:270m-slow")
    # By keyboard: Enter on Install, and the focus lands on the Cancel that took its place.
    row.get_by_role("button", name="Install").focus()
    page.keyboard.press("Enter")
    expect(row.get_by_role("button", name="Cancel")).to_be_focused()
    expect(row.locator(".job-text")).to_contain_text("Downloading")
    violations = axe_violations(page)  # with an install's progress on the page twice
    assert not violations, describe_violations(violations)
    page.reload()
    row = variant(page, "gemma3:270m-slow")
    text = row.locator(".job-text")
    expect(text).to_contain_text(re.compile(r"Downloading · \d+%"))
    first = text.inner_text()
    expect(text).not_to_have_text(first)  # still moving: the page follows the job's events again
    # The running install is listed among the installed models too, with its own Cancel.
    expect(installed_row(page, "gemma3:270m-slow").locator(".job-text")).to_contain_text("Downloading")
    screenshot(page, "models-installing")
    row.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    expect(row).to_contain_text("Install cancelled.")
    expect(row.get_by_role("button", name="Install")).to_be_focused()
    expect(page.locator("#toast")).to_have_text("The install of gemma3:270m-slow was cancelled.")
    expect(installed_row(page, "gemma3:270m-slow")).to_have_count(0)
    assert not (console.store / "gemma3-270m-slow.gguf").exists()
    assert not list((console.store / ".partial").glob("gemma3-270m-slow*.part"))  # the partial download went
    log.assert_clean()


def test_chat_streams_the_answer_with_its_speed(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/playground")
    expect(page.locator("#chat-model option")).to_have_count(1)
    page.select_option("#chat-model", "gemma3:270m")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "40")
    page.fill("#chat-input", "Write one sentence about the sea.")
    # Every length the answer's text takes while it streams, recorded in the page itself.
    page.evaluate(
        """() => {
            window.lengths = [];
            new MutationObserver(() => {
                const text = document.querySelector('#transcript .turn.assistant.streaming .text');
                if (text) window.lengths.push(text.textContent.length);
            }).observe(
                document.getElementById('transcript'), {subtree: true, childList: true, characterData: true}
            );
        }"""
    )
    page.keyboard.press("Enter")  # Enter sends
    answer = page.locator("#transcript .turn.assistant").last
    stats = answer.locator(".stats")
    expect(stats).to_contain_text(
        re.compile(r"first token \d+ ms · [\d.]+ tokens/s · \d+ tokens · finish: (length|stop)"),
        timeout=90_000,
    )
    assert answer.locator(".text").inner_text().strip()
    grown = sorted({n for n in page.evaluate("window.lengths") if n > 0})
    assert len(grown) >= 3, f"the answer did not arrive piece by piece: lengths seen {grown}"
    expect(page.locator("#transcript .turn.user")).to_have_text(
        re.compile("Write one sentence about the sea.")
    )
    expect(page.locator("#chat-input")).to_be_focused()
    expect(page.locator("#transcript")).to_have_attribute("aria-busy", "false")
    log.assert_clean()


def test_embeddings_show_cosine_similarities(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/playground")
    expect(page.locator("#embed-model option")).to_have_count(1)
    page.select_option("#embed-model", "gemma-embed:270m")
    page.fill(
        "#embed-input", "The cat sat on the mat.\nStock markets fell sharply today.\nThe cat sat on the mat."
    )
    page.get_by_role("button", name="Embed").click()
    table = page.locator("#embed-result table")
    expect(table.locator("caption")).to_have_text("Cosine similarity of 3 lines (640 dimensions)")
    cells = [
        [float(v) for v in row.locator("td").all_inner_texts()] for row in table.locator("tbody tr").all()
    ]
    assert len(cells) == 3 and all(len(row) == 3 for row in cells)
    assert all(cells[i][i] == pytest.approx(1.0, abs=1e-3) for i in range(3))
    assert cells[0][2] == pytest.approx(1.0, abs=1e-3)  # the same line twice
    assert -1 <= cells[0][1] < cells[0][2]
    expect(page.locator("#embed-result .summary")).to_have_text("Most alike: lines 1 and 3 (1.000).")
    screenshot(page, "playground")
    log.assert_clean()


def test_the_overview_shows_loaded_models_and_live_throughput(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/")
    loaded = page.locator("#overview table")
    expect(loaded).to_contain_text("gemma3:270m")
    expect(loaded).to_contain_text(re.compile(r"\d+\.\d MB"))
    expect(page.locator("#live-now")).to_contain_text(re.compile(r"[1-9]\d* tokens generated"))
    expect(page.locator("#spark-tokens polyline")).to_have_count(1)
    screenshot(page, "overview")
    log.assert_clean()


def test_installed_models_show_status_loaded_state_and_memory(page: Any, console: Console) -> None:
    (console.store / "dropped.gguf").write_bytes(b"GGUF" + b"\xff" * 60)  # hand-dropped and broken
    try:
        log = open_page(page, console, "/console/models")
        chat = installed_row(page, "gemma3:270m")
        expect(chat.locator(".badge.ok")).to_have_text("Ready")
        expect(chat.locator(".badge.live")).to_have_text(re.compile(r"Loaded · \d+\.\d MB"))  # chatted with
        expect(installed_row(page, "gemma-embed:270m").locator(".badge.live")).to_contain_text("Loaded")
        dropped = installed_row(page, "dropped")
        expect(dropped.locator(".badge.bad")).to_have_text("Invalid")
        expect(dropped.locator(".error")).to_contain_text("Why it cannot be served:")
        expect(dropped).to_contain_text("hand-dropped")
        log.assert_clean()
    finally:
        (console.store / "dropped.gguf").unlink()


def test_uninstall_asks_first_and_removes_the_files(page: Any, console: Console) -> None:
    log = open_page(page, console, "/console/models")
    row = installed_row(page, "gemma-embed:270m")
    dialog = page.locator("#confirm-uninstall")
    # By keyboard: the dialog opens on "Keep it", and Escape keeps the model.
    row.get_by_role("button", name="Uninstall").focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Uninstall gemma-embed:270m?")
    expect(dialog).to_contain_text("gemma-embed-270m.gguf (253.1 MB)")
    expect(dialog.get_by_role("button", name="Keep it")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row.get_by_role("button", name="Uninstall")).to_be_focused()
    # "Keep it" keeps it.
    row.get_by_role("button", name="Uninstall").click()
    dialog.get_by_role("button", name="Keep it").click()
    expect(dialog).to_be_hidden()
    assert (console.store / "gemma-embed-270m.gguf").is_file()
    # Confirmed, it goes, sidecar and all; the catalogue offers it again.
    row.get_by_role("button", name="Uninstall").click()
    screenshot(page, "uninstall")
    dialog.get_by_role("button", name="Uninstall").click()
    expect(row).to_have_count(0)
    expect(variant(page, "gemma-embed:270m").get_by_role("button", name="Install")).to_be_visible()
    assert not (console.store / "gemma-embed-270m.gguf").exists()
    assert not (console.store / "gemma-embed-270m.gguf.meta.json").exists()
    assert (console.store / "gemma3-270m.gguf").is_file()
    log.assert_clean()


PAGES = ("/console/", "/console/models", "/console/playground")


def settle(page: Any, path: str) -> None:
    if path == "/console/models":
        expect(page.locator("#catalogue .family").first).to_be_visible()
    elif path == "/console/":
        expect(page.locator("#overview .card").first).to_be_visible()
    else:
        expect(page.locator("#chat-model option")).to_have_count(1)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_page_passes_axe(browser: Any, console: Console, scheme: str) -> None:
    context = browser.new_context(color_scheme=scheme, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    for path in PAGES:
        log = open_page(page, console, path)
        settle(page, path)
        violations = axe_violations(page)
        assert not violations, f"{path} ({scheme}):\n{describe_violations(violations)}"
        log.assert_clean()
    # axe itself is running: a button with no name is a critical violation it must report.
    page.evaluate("document.querySelector('main').append(document.createElement('button'))")
    assert [v["id"] for v in axe_violations(page)] == ["button-name"]
    context.close()


def test_pages_fit_a_phone_and_follow_dark_mode(browser: Any, console: Console) -> None:
    context = browser.new_context(
        color_scheme="dark", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    for path in PAGES:
        log = open_page(page, console, path)
        settle(page, path)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a phone"
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(18, 21, 26)", background  # the dark palette
        log.assert_clean()
    page.goto(console.url + "/console/models")
    settle(page, "/console/models")
    screenshot(page, "models-phone-dark", full_page=False)
    context.close()
    light = browser.new_context(color_scheme="light")
    page = light.new_page()
    page.goto(console.url + "/console/")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(247, 248, 250)"
    light.close()


THINKER = "qwen35:tiny"


def listed(console: Console, name: str, timeout_s: float = 30) -> None:
    """Wait until the inference side lists `name` (it rescans a store that changed)."""
    deadline = time.monotonic() + timeout_s
    while name not in {m["id"] for m in httpx.get(console.url + "/v1/models").json()["data"]}:
        assert time.monotonic() < deadline, f"{name} was never listed"
        time.sleep(0.2)


def test_a_thinking_model_shows_its_reasoning_folded_above_the_answer(
    page: Any, console: Console, tmp_path: Path
) -> None:
    """Qwen3.5's real chat template on random weights: its prompt ends in `<think>`, so all it
    writes is reasoning, which streams into a closed "Thinking" fold above the answer; its row
    says it thinks. Last in the file, so that the tests before it see one chat model."""
    store = ModelStore(console.store)
    store.import_file(write_qwen35(tmp_path / "qwen35.gguf"), name=THINKER, purpose="chat")
    try:
        log = open_page(page, console, "/console/models")
        expect(installed_row(page, THINKER).locator(".badge.cap")).to_have_text(["tools", "thinking"])
        # Gemma's template (installed by the tests before) neither thinks nor calls tools.
        expect(page.locator("#installed .badge.cap", has_text="thinking")).to_have_count(1)
        violations = axe_violations(page)
        assert not violations, describe_violations(violations)

        listed(console, THINKER)
        page.goto(console.url + "/console/playground")
        expect(page.locator(f'#chat-model option[value="{THINKER}"]')).to_have_count(1)
        page.select_option("#chat-model", THINKER)
        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "24")
        page.fill("#chat-input", "Why is the sea blue?")
        # The fold as it streams: its reasoning's length, whether it is open, where it sits.
        page.evaluate(
            """() => {
                window.folds = [];
                const transcript = document.getElementById('transcript');
                new MutationObserver(() => {
                    const turn = transcript.querySelector('.turn.assistant.streaming');
                    const fold = turn && turn.querySelector('details.thinking');
                    if (fold) window.folds.push({
                        length: fold.querySelector('.reasoning').textContent.length,
                        open: fold.open,
                        above: fold.nextElementSibling === turn.querySelector('.text'),
                    });
                }).observe(transcript, {subtree: true, childList: true, characterData: true});
            }"""
        )
        page.keyboard.press("Enter")
        answer = page.locator("#transcript .turn.assistant").last
        expect(answer.locator(".stats")).to_contain_text(re.compile(r"\d+ tokens · finish: (length|stop)"))
        folds = page.evaluate("window.folds")
        grown = sorted({f["length"] for f in folds if f["length"] > 0})
        assert len(grown) >= 3, f"the reasoning did not arrive piece by piece: lengths seen {grown}"
        assert not any(f["open"] for f in folds) and all(f["above"] for f in folds)
        fold = answer.locator("details.thinking")
        expect(fold).to_have_count(1)
        expect(fold.locator("summary")).to_have_text("Thinking")
        reasoning = fold.locator(".reasoning")
        expect(reasoning).to_be_hidden()  # folded until asked for
        fold.locator("summary").click()
        expect(reasoning).to_be_visible()
        assert reasoning.evaluate("e => e.textContent.length") == grown[-1]
        assert answer.locator(".text").inner_text() == ""  # no </think>: the answer never began
        violations = axe_violations(page)
        assert not violations, describe_violations(violations)
        log.assert_clean()
    finally:
        store.uninstall(THINKER)


SEER = "qwen-vision:tiny"


def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (64, 48), color).save(path, "PNG")
    return path


def chat_request(page: Any, send: Any) -> dict[str, Any]:
    """The body of the chat request that `send()` makes the page send."""
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        send()
    body: dict[str, Any] = json.loads(request.value.post_data)
    return body


def shown_pictures(images: Any) -> list[str]:
    """The alt texts of `images`, once each has loaded: a picture the page's CSP refused never
    does (its natural width stays 0)."""
    images.first.wait_for()
    images.evaluate_all("es => Promise.all(es.map(e => e.decode()))")  # rejects for a refused one
    return images.evaluate_all("es => es.map(e => e.naturalWidth && e.alt)")  # type: ignore[no-any-return]


def test_a_vision_model_reads_an_image_attached_in_the_playground(
    page: Any, console: Console, tmp_path: Path
) -> None:
    """A Qwen3.5 with a vision projector: its row says `vision`; the playground offers "Attach
    image" for it (and not for Gemma), checks the size before sending, shows a thumbnail that can
    be removed, sends the picture as an OpenAI `image_url` part with a data URL, keeps it in the
    history for the next turn, and shows the server's 400 for an image it cannot read."""
    store = ModelStore(console.store)
    model, projector = write_qwen35_vision(tmp_path)
    store.import_file(model, name=SEER, purpose="chat", projector=projector)
    red = write_png(tmp_path / "red.png", (200, 30, 30))
    green = write_png(tmp_path / "green.png", (30, 200, 30))
    try:
        log = open_page(page, console, "/console/models")
        row = installed_row(page, SEER)
        expect(row.locator(".badge.cap")).to_have_text(["tools", "thinking", "vision"])
        expect(row.locator(".badge.cap", has_text="vision")).to_have_attribute("title", "Reads images")
        expect(page.locator("#installed .badge.cap", has_text="vision")).to_have_count(1)  # not Gemma

        listed(console, SEER)
        page.goto(console.url + "/console/playground")
        expect(page.locator(f'#chat-model option[value="{SEER}"]')).to_have_count(1)
        picker = page.get_by_label("Attach image")
        hint = page.locator("#chat-image-hint")
        page.select_option("#chat-model", "gemma3:270m")
        expect(picker).to_be_disabled()
        expect(picker).to_have_attribute("title", "The selected model reads no images")
        expect(hint).to_have_text("The selected model reads no images.")
        page.select_option("#chat-model", SEER)
        expect(picker).to_be_enabled()
        expect(hint).to_contain_text("up to 5 MiB")

        # Too large: said at once, nothing attached.
        error = page.locator("#chat-image-error")
        big = {"name": "big.png", "mimeType": "image/png", "buffer": b"\x89PNG" + bytes(5 * 1024**2)}
        picker.set_input_files(files=[big])
        expect(error).to_have_text("big.png is 5.2 MB: an image may be at most 5 MiB.")
        thumbs = page.locator("#chat-images li")
        expect(thumbs).to_have_count(0)
        # Two pictures, one removed by keyboard (the focus stays on a Remove button, or the picker).
        picker.set_input_files(files=[red, green])
        expect(thumbs).to_have_count(2)
        expect(error).to_have_text("")
        assert shown_pictures(thumbs.locator("img")) == ["red.png", "green.png"]
        page.get_by_role("button", name="Remove green.png").focus()
        page.keyboard.press("Enter")
        expect(thumbs).to_have_count(1)
        expect(thumbs.locator("img")).to_have_attribute("alt", "red.png")
        expect(page.get_by_role("button", name="Remove red.png")).to_be_focused()  # the one left
        violations = axe_violations(page)  # with a thumbnail waiting to be sent
        assert not violations, describe_violations(violations)

        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "8")
        page.fill("#chat-input", "What is in this picture?")
        body = chat_request(page, lambda: page.keyboard.press("Enter"))
        [asked] = body["messages"]
        picture, words = asked["content"]
        assert words == {"type": "text", "text": "What is in this picture?"}
        assert picture["type"] == "image_url"
        url = picture["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.removeprefix("data:image/png;base64,")) == red.read_bytes()
        answer = page.locator("#transcript .turn.assistant").last
        expect(answer.locator(".stats")).to_contain_text(re.compile(r"\d+ tokens · finish: (length|stop)"))
        expect(answer.locator(".error")).to_have_count(0)
        # Random weights think aloud (Qwen3.5's prompt ends in <think>): the answer is its reasoning.
        assert (
            answer.locator(".text").inner_text().strip()
            or answer.locator(".reasoning").evaluate("e => e.textContent").strip()
        )
        mine = page.locator("#transcript .turn.user").last
        assert shown_pictures(mine.locator("img")) == ["red.png"]
        expect(mine.locator(".text")).to_have_text("What is in this picture?")
        expect(thumbs).to_have_count(0)  # sent: the next message starts bare
        expect(page.locator("#chat-images")).to_be_hidden()
        screenshot(page, "playground-image")

        # The next turn sends the picture again, with the answer between.
        page.fill("#chat-input", "And its colour?")
        body = chat_request(page, lambda: page.keyboard.press("Enter"))
        first, reply, follow = body["messages"]
        assert first == asked and reply["role"] == "assistant"
        assert follow == {"role": "user", "content": "And its colour?"}
        answer = page.locator("#transcript .turn.assistant").last
        expect(answer.locator(".stats")).to_contain_text(re.compile(r"\d+ tokens · finish: (length|stop)"))
        expect(answer.locator(".error")).to_have_count(0)

        # A file that only says it is a PNG: the server's 400, shown under the turn.
        page.get_by_role("button", name="New conversation").click()
        fake = {"name": "fake.png", "mimeType": "image/png", "buffer": b"GIF89a but not really"}
        picker.set_input_files(files=[fake])
        expect(thumbs).to_have_count(1)
        page.fill("#chat-input", "And this?")
        page.keyboard.press("Enter")
        refused = page.locator("#transcript .turn.assistant").last.locator(".error")
        expect(refused).to_contain_text("not an image Pendra reads")
        violations = axe_violations(page)
        assert not violations, describe_violations(violations)
        # Chromium logs the 400 itself; nothing else may show.
        log.assert_clean(allow=("Failed to load resource: the server responded with a status of 400",))
    finally:
        store.uninstall(SEER)
