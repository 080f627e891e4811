"""Projects, keys, rate limits, usage and costs through the official SDK's admin API
(`client.admin.organization`) and httpx: every admin endpoint, the key lifecycle (create, use,
revoke, 401 at once), the 401/403 shapes, 429s with the x-ratelimit headers, limits shared by
two servers on one Postgres, and usage and costs equal to the ledger (GET /v1/usage)."""

from __future__ import annotations

import subprocess
import time

import openai
import pytest

from helpers import NANO, SHORT_PROMPT, assert_error
from test_batch_crash import POSTGRES_URL, postgres_database  # noqa: F401 (a fixture)

ADMIN_KEY = "sk-admin-e2e-0123456789abcdefghijklmnopqrstuvwxyz"
RATE_HEADERS = [
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
]


@pytest.fixture(scope="module")
def org_server(server_factory):
    """A server with an admin key (and so no open access)."""
    return server_factory("--admin-key", ADMIN_KEY)


def admin_client(server) -> openai.OpenAI:
    return server.client(api_key="sk-unused", admin_api_key=ADMIN_KEY)


def new_project(admin: openai.OpenAI, name: str) -> tuple[str, str, str]:
    """A project with one service account: (project id, key id, key)."""
    org = admin.admin.organization
    project = org.projects.create(name=name)
    account = org.projects.service_accounts.create(project.id, name=f"{name}-bot")
    return project.id, account.api_key.id, account.api_key.value


def chat(server, key: str, max_tokens: int = 4):
    """A chat completion with `key`: the raw response (headers) and its parsed body."""
    raw = server.client(api_key=key).chat.completions.with_raw_response.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=max_tokens, temperature=0
    )
    return raw, raw.parse()


def within_one_minute() -> None:
    """Waits for a fresh minute if this one is nearly over: limits count per minute window."""
    while time.time() % 60 > 40:
        time.sleep(0.5)


def test_every_admin_endpoint_through_the_sdk(org_server):
    admin = admin_client(org_server)
    org = admin.admin.organization
    project = org.projects.create(name="e2e alpha")
    assert project.object == "organization.project" and project.status == "active"
    assert org.projects.retrieve(project.id).name == "e2e alpha"
    assert org.projects.update(project.id, name="e2e alpha 2").name == "e2e alpha 2"
    assert project.id in [p.id for p in org.projects.list()]

    account = org.projects.service_accounts.create(project.id, name="ci")
    key = account.api_key.value
    assert key.startswith("sk-proj-")
    assert org.projects.service_accounts.retrieve(account.id, project_id=project.id).name == "ci"
    assert [a.id for a in org.projects.service_accounts.list(project.id)] == [account.id]
    keys = list(org.projects.api_keys.list(project.id))
    assert [k.id for k in keys] == [account.api_key.id]
    assert key not in keys[0].redacted_value and keys[0].redacted_value.endswith(key[-4:])
    retrieved = org.projects.api_keys.retrieve(account.api_key.id, project_id=project.id)
    assert retrieved.owner.service_account.id == account.id

    limits = {rl.model: rl for rl in org.projects.rate_limits.list_rate_limits(project.id)}
    assert limits[NANO].id == f"rl-{NANO}"
    updated = org.projects.rate_limits.update_rate_limit(
        f"rl-{NANO}", project_id=project.id, max_requests_per_1_minute=1234
    )
    assert updated.max_requests_per_1_minute == 1234
    assert updated.max_tokens_per_1_minute == limits[NANO].max_tokens_per_1_minute

    created = org.admin_api_keys.create(name="second admin")
    assert created.value.startswith("sk-admin-")
    assert org.admin_api_keys.retrieve(created.id).name == "second admin"
    assert created.id in [k.id for k in org.admin_api_keys.list()]
    # The new admin key works on the admin API; deleted, it stops at once.
    other = org_server.client(api_key="sk-unused", admin_api_key=created.value)
    assert other.admin.organization.projects.retrieve(project.id).id == project.id
    assert org.admin_api_keys.delete(created.id).deleted
    with pytest.raises(openai.AuthenticationError):
        other.admin.organization.projects.retrieve(project.id)

    assert org.projects.service_accounts.delete(account.id, project_id=project.id).deleted
    archived = org.projects.archive(project.id)
    assert archived.status == "archived" and archived.archived_at
    assert project.id not in [p.id for p in org.projects.list()]
    assert project.id in [p.id for p in org.projects.list(include_archived=True)]


def test_a_key_is_used_then_revoked_and_refused_at_once(org_server):
    admin = admin_client(org_server)
    org = admin.admin.organization
    project_id, key_id, key = new_project(admin, "lifecycle")
    assert org.projects.api_keys.retrieve(key_id, project_id=project_id).last_used_at is None
    raw, completion = chat(org_server, key)
    assert completion.choices[0].message.content is not None
    for name in RATE_HEADERS:
        assert raw.headers.get(name), f"{name} missing: {dict(raw.headers)}"
    assert org.projects.api_keys.retrieve(key_id, project_id=project_id).last_used_at

    assert org.projects.api_keys.delete(key_id, project_id=project_id).deleted
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(org_server, key)
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"


def test_401_and_403_shapes(org_server):
    admin = admin_client(org_server)
    _, _, key = new_project(admin, "shapes")
    with org_server.http() as http:
        # No key, or a made-up one, on the API.
        assert_error(http.get("/v1/models"), 401, type="invalid_request_error")
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer sk-proj-made-up"})
        assert_error(wrong, 401, code="invalid_api_key", type="invalid_request_error")
        # A project key on the admin API: 401, naming the missing scope.
        as_project = {"Authorization": f"Bearer {key}"}
        error = assert_error(
            http.get("/v1/organization/projects", headers=as_project), 401,
            type="invalid_request_error", code=None,
        )
        assert "Missing scopes: api.management.read" in error["message"]
        error = assert_error(
            http.post("/v1/organization/projects", headers=as_project, json={"name": "x"}), 401,
            type="invalid_request_error", code=None,
        )
        assert "Missing scopes: api.management.write" in error["message"]
        # The admin key on the model API: 403.
        as_admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert_error(http.get("/v1/models", headers=as_admin), 403, type="invalid_request_error")
        # The project key on its own API works.
        assert http.get("/v1/models", headers=as_project).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        org_server.client(api_key="sk-unused", admin_api_key=key).admin.organization.projects.list()
    with pytest.raises(openai.PermissionDeniedError):
        chat(org_server, ADMIN_KEY)


def test_the_old_single_api_key_keeps_working(server_factory):
    server = server_factory("--api-key", "sk-old-single-key")
    try:
        _, completion = chat(server, "sk-old-single-key")
        assert completion.usage.total_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            chat(server, "sk-something-else")
    finally:
        server.stop()


def test_rate_limits_answer_429_with_the_headers(org_server):
    admin = admin_client(org_server)
    org = admin.admin.organization
    project_id, _, key = new_project(admin, "limited")
    org.projects.rate_limits.update_rate_limit(
        f"rl-{NANO}", project_id=project_id, max_requests_per_1_minute=2,
        max_tokens_per_1_minute=2000,
    )
    within_one_minute()
    raw, _ = chat(org_server, key)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-limit-tokens"] == "2000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 2000
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    chat(org_server, key)
    with pytest.raises(openai.RateLimitError) as limited:
        chat(org_server, key)
    e = limited.value
    assert e.status_code == 429 and e.code == "rate_limit_exceeded"
    assert e.body["type"] == "requests", e.body
    assert "requests per min (RPM): Limit 2" in e.body["message"]
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    for name in RATE_HEADERS:
        assert e.response.headers.get(name), name

    # Tokens: a request whose output alone passes the limit is refused.
    org.projects.rate_limits.update_rate_limit(
        f"rl-{NANO}", project_id=project_id, max_requests_per_1_minute=100
    )
    with pytest.raises(openai.RateLimitError) as limited:
        chat(org_server, key, max_tokens=5000)
    assert limited.value.body["type"] == "tokens"
    assert "tokens per min (TPM): Limit 2000" in limited.value.body["message"]


def test_usage_and_costs_equal_the_ledger(fresh_server_with_admin):
    server = fresh_server_with_admin
    admin = admin_client(server)
    org = admin.admin.organization
    start = int(time.time()) - 60
    projects = {}
    for name, n in (("usage-a", 3), ("usage-b", 1)):
        project_id, key_id, key = new_project(admin, name)
        projects[project_id] = (key_id, n)
        for _ in range(n):
            chat(server, key, max_tokens=6)
    with server.http() as http:
        ledger = {t["model"]: t for t in http.get(
            "/v1/usage", headers={"Authorization": f"Bearer {key}"}
        ).json()["data"]}[NANO]

    usage = org.usage.completions(
        start_time=start, bucket_width="1h", group_by=["project_id", "api_key_id", "model"]
    )
    assert usage.has_more is False
    results = [r for bucket in usage.data for r in bucket.results]
    assert {r.project_id: (r.api_key_id, r.num_model_requests) for r in results} == projects
    assert sum(r.num_model_requests for r in results) == ledger["requests"]
    assert sum(r.input_tokens for r in results) == ledger["prompt_tokens"]
    assert sum(r.output_tokens for r in results) == ledger["completion_tokens"]
    assert sum(r.input_cached_tokens for r in results) == ledger["cached_tokens"]

    costs = org.usage.costs(start_time=start, group_by=["project_id", "line_item"])
    items = [r for bucket in costs.data for r in bucket.results]
    assert abs(sum(r.amount.value for r in items) - ledger["cost_usd"]) < 1e-12
    assert {r.line_item for r in items} >= {f"{NANO}, input", f"{NANO}, output"}
    assert {r.project_id for r in items} == set(projects)


@pytest.fixture
def fresh_server_with_admin(server_factory):
    server = server_factory("--admin-key", ADMIN_KEY)
    yield server
    server.stop()


@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="FERRUM_TEST_POSTGRES_URL is not set (scripts/test.sh starts a throwaway Postgres)",
)
def test_two_servers_on_one_postgres_share_the_limits(server_at, postgres_database, tmp_path):  # noqa: F811
    servers = [
        server_at(tmp_path / name, "--admin-key", ADMIN_KEY, database_url=postgres_database)
        for name in ("a", "b")
    ]
    a, b = servers
    admin = admin_client(a)
    project_id, _, key = new_project(admin, "shared")
    admin.admin.organization.projects.rate_limits.update_rate_limit(
        f"rl-{NANO}", project_id=project_id, max_requests_per_1_minute=3
    )
    within_one_minute()
    remaining = [chat(s, key)[0].headers["x-ratelimit-remaining-requests"] for s in (a, b, a)]
    assert remaining == ["2", "1", "0"]
    for server in (b, a):
        with pytest.raises(openai.RateLimitError):
            chat(server, key)
    # A key revoked through one server is refused by the other at once.
    key_id = next(iter(admin.admin.organization.projects.api_keys.list(project_id))).id
    admin.admin.organization.projects.api_keys.delete(key_id, project_id=project_id)
    with pytest.raises(openai.AuthenticationError):
        chat(b, key)


def test_admin_init_creates_a_key_that_secures_the_server(ferrum_bin, server_at, tmp_path):
    database = f"sqlite://{tmp_path / 'ferrum.db'}"
    init = subprocess.run(
        [str(ferrum_bin), "admin", "init", "--database", database],
        capture_output=True, text=True, timeout=60,
    )
    assert init.returncode == 0, init.stderr
    key = init.stdout.strip()
    assert key.startswith("sk-admin-"), init.stdout
    server = server_at(tmp_path, database_url=database)
    try:
        admin = server.client(api_key="sk-unused", admin_api_key=key)
        assert [k.name for k in admin.admin.organization.admin_api_keys.list()] == [
            "ferrum admin init"
        ]
        # The database has a key now: the model API needs a project key.
        with pytest.raises(openai.AuthenticationError):
            chat(server, "sk-anything")
    finally:
        server.stop()
