"""The web console at `/`, in a real headless Chromium (browser.py): signing in with a key, the
playground streaming a chat completion (the same text the API gives), the usage page, the
admin's projects and keys, and labelled form controls. Screenshots of each page are written to
the test's temporary directory (`--basetemp` keeps them) for a person to look at."""

from __future__ import annotations

import json
import time

import openai
import pytest

from browser import Browser
from helpers import NANO

KEY = "sk-console-test-key"
ADMIN_KEY = "sk-admin-console-test-key"


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def sign_in(browser: Browser, base_url: str, key: str) -> None:
    browser.open(f"{base_url}/")
    browser.wait("!document.getElementById('sign-in').hidden")
    browser.js(f"document.getElementById('key').value = {json.dumps(key)};"
               "document.getElementById('sign-in-form').requestSubmit()")


def test_console_signs_in_streams_and_shows_usage(server_factory, browser, tmp_path):
    server = server_factory("--api-key", KEY)
    # A wrong key is refused with the API's own message, and nothing else opens.
    sign_in(browser, server.base_url, "sk-wrong")
    browser.wait("document.getElementById('sign-in-error').textContent.length > 0")
    assert browser.js("document.getElementById('tabs').hidden") is True

    sign_in(browser, server.base_url, KEY)
    browser.wait("!document.getElementById('tabs').hidden")
    models = browser.js("[...document.getElementById('model').options].map(o => o.value)")
    assert NANO in models, models
    # Every form control has a label (its own, or an aria-label).
    unlabelled = browser.js(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(c => !c.labels.length && !c.getAttribute('aria-label')).map(c => c.id)")
    assert unlabelled == [], unlabelled

    prompt = "Name three colours."
    browser.js(f"""
        document.getElementById('model').value = {json.dumps(NANO)};
        document.getElementById('temperature').value = '0';
        document.getElementById('max-tokens').value = '24';
        document.getElementById('prompt').value = {json.dumps(prompt)};
        document.getElementById('chat-form').requestSubmit();
    """)
    browser.wait("document.getElementById('answer-usage').textContent.includes('output tokens')")
    streamed = browser.js("document.getElementById('answer').textContent")
    usage_line = browser.js("document.getElementById('answer-usage').textContent")
    browser.screenshot(tmp_path / "console-playground.png")
    # The page streamed exactly what the API answers to the same greedy request.
    client = openai.OpenAI(base_url=server.api_base, api_key=KEY)
    whole = client.chat.completions.create(
        model=NANO, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24)
    assert streamed == whole.choices[0].message.content, (streamed, whole)
    assert f"{whole.usage.completion_tokens} output tokens" in usage_line, usage_line
    assert "$" in usage_line, usage_line  # the cost, from the tier's prices

    browser.js("document.querySelector('[data-tab=usage]').click()")
    browser.wait(f"[...document.querySelectorAll('#usage-table tbody tr')]"
                 f".some(r => r.cells[0].textContent === {json.dumps(NANO)})")
    row = browser.js(f"[...document.querySelectorAll('#usage-table tbody tr')]"
                     f".find(r => r.cells[0].textContent === {json.dumps(NANO)})"
                     f".cells[1].textContent")
    assert int(row) >= 1, row
    browser.screenshot(tmp_path / "console-usage.png")
    assert not [m for m in browser.console if m.startswith("exception")], browser.console


def test_console_admin_manages_projects_keys_and_limits(server_factory, browser, tmp_path):
    server = server_factory("--admin-key", ADMIN_KEY)
    sign_in(browser, server.base_url, ADMIN_KEY)
    browser.wait("!document.getElementById('tabs').hidden")
    # An admin key cannot call models (OpenAI's rule): no playground; usage opens first.
    assert browser.js("document.querySelector('[data-tab=playground]').hidden") is True
    assert browser.js("!document.getElementById('usage').hidden") is True

    browser.js("document.querySelector('[data-tab=admin]').click()")
    browser.js("document.getElementById('project-name').value = 'console-e2e';"
               "document.getElementById('project-form').requestSubmit()")
    browser.wait("[...document.querySelectorAll('#projects-table tbody tr')]"
                 ".some(r => r.cells[0].textContent === 'console-e2e')")
    browser.js("[...document.querySelectorAll('#projects-table tbody tr')]"
               ".find(r => r.cells[0].textContent === 'console-e2e')"
               ".querySelector('button').click()")
    browser.wait("!document.getElementById('project-detail').hidden")
    browser.js("document.getElementById('account-name').value = 'ui-bot';"
               "document.getElementById('account-form').requestSubmit()")
    browser.wait("!document.getElementById('new-key').hidden")
    notice = browser.js("document.getElementById('new-key').textContent")
    key = notice.rsplit(": ", 1)[1]
    assert key.startswith("sk-proj-"), notice
    browser.wait("document.querySelectorAll('#keys-table tbody tr').length === 1")
    browser.wait("document.querySelectorAll('#limits-table tbody tr').length > 0")
    browser.screenshot(tmp_path / "console-admin.png")

    # The key the page showed calls the model API, and its use shows in the usage page.
    project = openai.OpenAI(base_url=server.api_base, api_key=key)
    project.chat.completions.create(model=NANO, max_tokens=4,
                                    messages=[{"role": "user", "content": "Hi"}])
    browser.js("document.querySelector('[data-tab=usage]').click()")
    browser.wait("document.querySelector('#tokens-chart svg') !== null")
    browser.wait(f"[...document.querySelectorAll('#usage-table tbody tr')]"
                 f".some(r => r.cells[0].textContent === {json.dumps(NANO)})")
    browser.screenshot(tmp_path / "console-admin-usage.png")

    # A limit saved in the page is the project's limit in the API.
    browser.js("document.querySelector('[data-tab=admin]').click()")
    browser.wait("!document.getElementById('project-detail').hidden")
    browser.wait("document.querySelectorAll('#limits-table tbody tr').length > 0")
    browser.js(f"""(() => {{
        const row = [...document.querySelectorAll('#limits-table tbody tr')]
            .find(r => r.cells[0].textContent === {json.dumps(NANO)});
        row.cells[1].querySelector('input').value = '7';
        row.cells[3].querySelector('input').value = '5000';
        row.querySelector('button').click();
    }})()""")
    admin = openai.OpenAI(base_url=server.api_base, api_key="unused", admin_api_key=ADMIN_KEY)
    project_id = browser.js("document.getElementById('project-detail-title').textContent"
                            ".match(/\\((proj_[^)]+)\\)/)[1]")

    def nano_limit():
        limits = admin.admin.organization.projects.rate_limits.list_rate_limits(project_id)
        limit = next(l for l in limits if l.model == NANO)
        return limit.max_requests_per_1_minute, limit.model_extra["reserved_tokens_per_1_minute"]

    deadline = time.monotonic() + 10
    while nano_limit() != (7, 5000) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert nano_limit() == (7, 5000)

    # Revoked in the page: refused at once.
    browser.js("document.querySelector('#keys-table tbody tr button').click()")
    browser.wait("document.querySelectorAll('#keys-table tbody tr').length === 0")
    with pytest.raises(openai.AuthenticationError):
        project.chat.completions.create(model=NANO, max_tokens=4,
                                        messages=[{"role": "user", "content": "Hi"}])
    assert not [m for m in browser.console if m.startswith("exception")], browser.console
