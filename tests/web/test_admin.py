"""Administration: callers and destinations (through dicom_node.aes), users, settings, audit log."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from dicom_node.store.db import session_scope
from dicom_node.store.models import AeRole, AuditEvent, DeliveryState, RemoteAe, User, WebSession
from dicom_node.web import admin, create_app, paging
from tests.web.conftest import ADMIN, RADIOLOGIST, form_csrf, login
from tests.web.keyset import walk_by_links
from tests.web.studies import StudySpec, add_study

pytestmark = [pytest.mark.db]


def _aes(factory: sessionmaker[Session]) -> list[tuple[str, str, str | None, int | None, str | None]]:
    with session_scope(factory) as s:
        return [
            (a.ae_title, a.role.value, a.host, a.port, a.reply_to.ae_title if a.reply_to else None)
            for a in s.scalars(select(RemoteAe).order_by(RemoteAe.id))
        ]


def _audit(factory: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    with session_scope(factory) as s:
        return [(e.actor, e.action, e.target) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_destination_and_caller_create_edit_delete(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    client, csrf = admin_client
    add = client.post(
        "/admin/aes",
        data={
            "csrf_token": csrf,
            "role": "destination",
            "ae_title": "ORTHANC",
            "host": "10.0.0.5",
            "port": "4242",
            "description": "Main PACS",
            "enabled": "1",
        },
    )
    assert add.status_code == 303 and add.headers["location"] == "/admin/aes?notice=ae-added"
    client.post(
        "/admin/aes",
        data={
            "csrf_token": csrf,
            "role": "caller",
            "ae_title": "MODALITY1",
            "reply_to": "ORTHANC",
            "enabled": "1",
        },
    )
    assert _aes(factory) == [
        ("ORTHANC", "destination", "10.0.0.5", 4242, None),
        ("MODALITY1", "caller", None, None, "ORTHANC"),
    ]
    page = client.get("/admin/aes?notice=ae-added").text
    assert "The AE was added." in page and "Main PACS" in page and "Test (C-ECHO)" in page
    assert ">nowhere</span>" not in page
    with session_scope(factory) as s:
        dest_id = s.scalars(select(RemoteAe.id).where(RemoteAe.ae_title == "ORTHANC")).one()
    edit = client.get(f"/admin/aes/{dest_id}").text
    assert 'value="4242"' in edit
    saved = client.post(
        f"/admin/aes/{dest_id}",
        data={
            "csrf_token": csrf,
            "role": "destination",
            "ae_title": "ORTHANC",
            "host": "10.0.0.6",
            "port": "11112",
            "enabled": "1",
        },
    )
    assert saved.status_code == 303
    assert _aes(factory)[0] == ("ORTHANC", "destination", "10.0.0.6", 11112, None)
    assert client.post(f"/admin/aes/{dest_id}/delete", data={"csrf_token": csrf}).status_code == 303
    assert [a[0] for a in _aes(factory)] == ["MODALITY1"]
    # its reply-to is gone and no fixed destination is set: the list says its results go nowhere
    assert _aes(factory)[0][4] is None and ">nowhere</span>" in client.get("/admin/aes").text
    actions = [(actor, action) for actor, action, _ in _audit(factory) if action.startswith("ae.")]
    assert actions == [
        ("user:alice", "ae.add"),
        ("user:alice", "ae.add"),
        ("user:alice", "ae.update"),
        ("user:alice", "ae.remove"),
    ]


def test_a_destination_that_received_results_cannot_be_removed_only_disabled(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    """Its deliveries record where each report went; the page says why and nothing changes."""
    client, csrf = admin_client
    add_study(factory, StudySpec(deliveries={"PACS": DeliveryState.DELIVERED}))
    with session_scope(factory) as s:
        dest_id = s.scalars(select(RemoteAe.id).where(RemoteAe.ae_title == "PACS")).one()
    response = client.post(f"/admin/aes/{dest_id}/delete", data={"csrf_token": csrf})
    assert response.status_code == 409
    assert "PACS has 2 result deliveries on record; disable it instead" in response.text
    assert [a[0] for a in _aes(factory)] == ["PACS"]
    assert [action for _, action, _ in _audit(factory) if action.startswith("ae.")] == []


def test_a_destination_with_deliveries_or_repliers_cannot_become_a_caller(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    """Removing it was refused, but an edit to the caller role wiped its host and port: the study page
    showed "PACS ?:?" and a resend went to port 0 (review)."""
    client, csrf = admin_client
    add_study(factory, StudySpec(deliveries={"PACS": DeliveryState.DEAD}))
    client.post("/admin/aes", data={"csrf_token": csrf, "role": "destination", "ae_title": "OTHER",
                                    "host": "pacs2", "port": "104", "enabled": "1"})  # fmt: skip
    client.post("/admin/aes", data={"csrf_token": csrf, "role": "caller", "ae_title": "CR1",
                                    "reply_to": "OTHER", "enabled": "1"})  # fmt: skip
    with session_scope(factory) as s:
        ids = dict(s.execute(select(RemoteAe.ae_title, RemoteAe.id)).tuples().all())
    for title, reason in (("PACS", "PACS has 2 result deliveries on record; disable it instead of making"),
                          ("OTHER", "1 caller(s) send their results to OTHER; change them first")):
        response = client.post(f"/admin/aes/{ids[title]}", data={
            "csrf_token": csrf, "role": "caller", "ae_title": title, "enabled": "1"})  # fmt: skip
        assert response.status_code == 422 and reason in response.text, title  # the edit form, as a clash
    assert ("PACS", "destination", "127.0.0.1", 104, None) in _aes(factory)


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"role": "destination", "host": "pacs", "port": "\u00b2"}, "port must be a number 1-65535", "port"),
        ({"role": "caller", "port": "0"}, "port must be 1-65535", "port"),  # the AE API then failed: 500
        ({"role": "caller", "port": "70000"}, "port must be 1-65535", "port"),
        ({"role": "caller", "description": "Main\x00PACS"}, "description must be printable", "description"),
        ({"role": "destination", "host": "999.999.999.999", "port": "104"}, "host must be", "host"),
        # the listener takes any caller plain unless dicom.tls.enabled: the caller's flag was shown as
        # "TLS yes" while that caller's images came in unencrypted
        ({"role": "caller", "tls": "1"}, "DICOM TLS applies to destinations only", "tls"),
    ],
)
def test_an_ae_field_a_caller_or_the_api_cannot_use_is_refused(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], fields: dict[str, str], reason: str,
    field: str,
) -> None:
    """Each was a 500 or a stored value that broke /api/admin/aes for every entry (review)."""
    client, csrf = admin_client
    form = {"csrf_token": csrf, "ae_title": "NEW1", "enabled": "1", **fields}
    response = client.post("/admin/aes", data=form)
    assert response.status_code == 422 and reason in response.text
    assert _invalid_fields(response.text) == [field]
    assert _aes(factory) == []


def test_invalid_ae_is_shown_with_its_error_and_nothing_is_stored(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    client, csrf = admin_client
    response = client.post(
        "/admin/aes", data={"csrf_token": csrf, "role": "destination", "ae_title": "NOPORT", "host": "pacs"}
    )
    assert response.status_code == 422
    assert "a destination needs host and port" in response.text
    assert 'value="NOPORT"' in response.text  # the form keeps what was typed
    # the field the message is about is marked and described by it (WCAG 3.3.1), and only that one
    assert _invalid_fields(response.text) == ["port"]
    response = client.post(
        "/admin/aes",
        data={"csrf_token": csrf, "role": "destination", "ae_title": "X" * 17, "host": "h", "port": "1"},
    )
    assert "AE title must be 1-16" in response.text and _invalid_fields(response.text) == ["ae_title"]
    client.post("/admin/aes", data={"csrf_token": csrf, "role": "caller", "ae_title": "DUP"})
    dup = client.post("/admin/aes", data={"csrf_token": csrf, "role": "caller", "ae_title": "DUP"})
    assert dup.status_code == 422 and "exists already" in dup.text
    assert _invalid_fields(dup.text) == ["ae_title"]
    assert [a[0] for a in _aes(factory)] == ["DUP"]
    api = client.post("/api/admin/aes", json={"role": "caller", "ae_title": "P", "host": "no such host!"},
                      headers={"X-CSRF-Token": csrf})
    assert api.status_code == 422 and api.json()["field"] == "host"
    # a reply_to that names no destination is a field to mend, as on the form, not a 404 for the AE itself
    api = client.post("/api/admin/aes", json={"role": "caller", "ae_title": "P", "reply_to": "NOPACS"},
                      headers={"X-CSRF-Token": csrf})
    assert api.status_code == 422 and api.json()["field"] == "reply_to"
    assert "no destination AE titled 'NOPACS'" in api.json()["detail"]
    form = client.post("/admin/aes", data={"csrf_token": csrf, "role": "caller", "ae_title": "P2",
                                           "reply_to": "NOPACS"})
    assert form.status_code == 422 and _invalid_fields(form.text) == ["reply_to"]
    assert [a[0] for a in _aes(factory)] == ["DUP"]


def test_a_destination_is_set_to_storage_commitment_and_a_caller_cannot_be(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    client, csrf = admin_client
    form = {"csrf_token": csrf, "role": "destination", "ae_title": "PACS", "host": "10.0.0.5", "port": "104",
            "enabled": "1", "storage_commitment": "1"}
    assert client.post("/admin/aes", data=form).status_code == 303
    with session_scope(factory) as s:
        pacs = s.scalars(select(RemoteAe).where(RemoteAe.ae_title == "PACS")).one()
        assert pacs.storage_commitment is True
        pacs_id = pacs.id
    page = client.get(f"/admin/aes/{pacs_id}").text
    assert re.search(r'name="storage_commitment" value="1" checked', page)
    listing = client.get("/admin/aes").text
    assert "<th>Storage commitment</th>" in listing
    added = [e for e in _audit_details(factory) if e[0] == "ae.add"]
    assert added[-1][1]["storage_commitment"] is True
    refused = client.post("/admin/aes", data={**form, "role": "caller", "ae_title": "MOD", "port": ""})
    assert refused.status_code == 422 and "storage commitment applies to destinations only" in refused.text
    assert _invalid_fields(refused.text) == ["storage_commitment"]
    api = client.get("/api/admin/aes", params={"role": "destination"}).json()
    assert [a["storage_commitment"] for a in api] == [True]


def _audit_details(factory: sessionmaker[Session]) -> list[tuple[str, dict[str, object]]]:
    with session_scope(factory) as s:
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.id))
        return [(e.action, dict(e.details or {})) for e in events]


def test_a_refused_new_user_marks_the_field_it_is_about(admin_client: tuple[TestClient, str]) -> None:
    client, csrf = admin_client
    form = {"csrf_token": csrf, "username": "dr.new", "role": "radiologist"}
    weak = client.post("/admin/users", data={**form, "password": "password1", "password_repeat": "password1"})
    assert weak.status_code == 422 and _invalid_fields(weak.text) == ["password"]
    differ = client.post("/admin/users", data={**form, "password": "a long phrase one",
                                              "password_repeat": "a long phrase two"})
    assert _invalid_fields(differ.text) == ["password_repeat"]
    bad_name = client.post("/admin/users", data={**form, "username": "dr new", "password": "x",
                                                "password_repeat": "x"})
    assert _invalid_fields(bad_name.text) == ["username"]


def _invalid_fields(html: str) -> list[str]:
    """The names of the form fields marked invalid and described by the page's form error."""
    return re.findall(r'name="([a-z_]+)"[^>]*aria-invalid="true" aria-describedby="form-error"', html)


def test_api_ae_crud(admin_client: tuple[TestClient, str], factory: sessionmaker[Session]) -> None:
    client, csrf = admin_client
    h = {"X-CSRF-Token": csrf}
    created = client.post(
        "/api/admin/aes",
        json={"role": "destination", "ae_title": "PACS", "host": "h", "port": 104},
        headers=h,
    )
    assert created.status_code == 201
    ae_id = created.json()["id"]
    updated = client.put(
        f"/api/admin/aes/{ae_id}",
        json={"role": "destination", "ae_title": "PACS", "host": "h2", "port": 105, "tls": True},
        headers=h,
    )
    assert updated.json()["host"] == "h2" and updated.json()["tls"] is True
    assert (
        client.post(
            "/api/admin/aes",
            json={"role": "destination", "ae_title": "PACS", "host": "h", "port": 104},
            headers=h,
        ).status_code
        == 409
    )
    assert (
        client.post(
            "/api/admin/aes", json={"role": "destination", "ae_title": "NOHOST", "port": 104}, headers=h
        ).status_code
        == 422
    )
    assert [a["ae_title"] for a in client.get("/api/admin/aes", params={"role": "destination"}).json()] == [
        "PACS"
    ]
    assert client.delete(f"/api/admin/aes/{ae_id}", headers=h).status_code == 204
    assert client.delete(f"/api/admin/aes/{ae_id}", headers=h).status_code == 404
    assert _aes(factory) == []


def test_echo_to_an_unreachable_destination_reports_failure(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    """Without dicom_node.scu (another helper's module) the page says why instead of crashing."""
    client, csrf = admin_client
    client.post(
        "/admin/aes",
        data={
            "csrf_token": csrf,
            "role": "destination",
            "ae_title": "GONE",
            "host": "127.0.0.1",
            "port": "1",
            "enabled": "1",
        },
    )
    with session_scope(factory) as s:
        ae_id = s.scalars(select(RemoteAe.id)).one()
    page = client.post(f"/admin/aes/{ae_id}/echo", data={"csrf_token": csrf})
    assert page.status_code == 200
    assert 'class="msg bad"' in page.text and "C-ECHO to GONE at 127.0.0.1:1 failed" in page.text
    assert client.post(f"/api/admin/aes/{ae_id}/echo", headers={"X-CSRF-Token": csrf}).json()["ok"] is False
    # a C-ECHO is the admin's doing on the network, recorded as `cxr-node ae echo` records it
    echoes = [event for event in _audit(factory) if event[1] == "ae.echo"]
    assert echoes == [("user:alice", "ae.echo", f"remote_ae:{ae_id}")] * 2


def test_users_add_disable_enable_and_reset_password(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], app: object
) -> None:
    client, csrf = admin_client
    added = client.post(
        "/admin/users",
        data={
            "csrf_token": csrf,
            "username": "carol",
            "role": "radiologist",
            "password": "tulip-river-lamp",
            "password_repeat": "tulip-river-lamp",
        },
    )
    assert added.status_code == 303
    assert "carol" in client.get("/admin/users").text
    short = client.post(
        "/admin/users",
        data={
            "csrf_token": csrf,
            "username": "dave",
            "role": "radiologist",
            "password": "short",
            "password_repeat": "short",
        },
    )
    assert short.status_code == 422 and "at least 10 characters" in short.text
    with session_scope(factory) as s:
        carol = s.scalars(select(User).where(User.username == "carol")).one()
        assert carol.password_hash.startswith("$argon2id$")
        carol_id = carol.id
    # carol logs in elsewhere; disabling her ends that session at once
    with TestClient(app, follow_redirects=False) as other:  # type: ignore[arg-type]
        login(other, "carol", "tulip-river-lamp")
        assert other.get("/results").status_code == 200
        assert (
            client.post(
                f"/admin/users/{carol_id}/active", data={"csrf_token": csrf, "active": "0"}
            ).status_code
            == 303
        )
        assert other.get("/results").status_code == 303
        page = other.get("/login")
        refused = other.post(
            "/login",
            data={"username": "carol", "password": "tulip-river-lamp", "csrf_token": form_csrf(page.text)},
        )
        assert refused.status_code == 401
        client.post(f"/admin/users/{carol_id}/active", data={"csrf_token": csrf, "active": "1"})
        reset = client.post(
            f"/admin/users/{carol_id}/password",
            data={
                "csrf_token": csrf,
                "password": "oak-harbour-violin",
                "password_repeat": "oak-harbour-violin",
            },
        )
        assert reset.status_code == 303
        login(other, "carol", "oak-harbour-violin")
    actions = [a for _, a, t in _audit(factory) if t == f"app_user:{carol_id}"]
    assert actions[:5] == ["user.add", "user.login", "user.disable", "user.login_failed", "user.enable"]
    assert "user.set_password" in actions


def test_the_last_admin_cannot_be_disabled(
    admin_client: tuple[TestClient, str], accounts: dict[str, int]
) -> None:
    client, csrf = admin_client
    response = client.post(
        f"/admin/users/{accounts['admin']}/active", data={"csrf_token": csrf, "active": "0"}
    )
    assert response.status_code == 409 and "last active admin" in response.text
    assert client.get("/admin/users").status_code == 200


def test_api_users(admin_client: tuple[TestClient, str]) -> None:
    client, csrf = admin_client
    h = {"X-CSRF-Token": csrf}
    created = client.post(
        "/api/admin/users",
        json={"username": "erin", "role": "radiologist", "password": "maple-stone-cloud"},
        headers=h,
    )
    assert created.status_code == 201 and "password" not in created.text
    patched = client.patch(f"/api/admin/users/{created.json()['id']}", json={"active": False}, headers=h)
    assert patched.json()["active"] is False
    assert (
        client.post(
            "/api/admin/users",
            json={"username": "erin", "role": "admin", "password": "maple-stone-cloud"},
            headers=h,
        ).status_code
        == 409
    )
    listed = client.get("/api/admin/users").json()
    assert [u["username"] for u in listed] == [ADMIN[0], "erin", RADIOLOGIST[0]]
    # With its zone: SQLite hands back naive UTC, which JavaScript's Date would read as local time.
    assert all(u["created_at"].endswith("Z") for u in listed) and listed[0]["last_login_at"].endswith("Z")


def test_settings_page_is_read_only_and_masks_secrets(
    tmp_path: Path, factory: sessionmaker[Session], accounts: dict[str, int]
) -> None:
    db_url = f"sqlite:///{tmp_path / 'var' / 'cxr-node.sqlite3'}"
    settings = Settings(
        node={"data_dir": tmp_path / "var", "name": "Ward CXR node"},
        database={"url": db_url},
        web={"secret_key": "very-secret-session-key-of-32-chars"},
        dicom={"ae_title": "WARDNODE", "port": 11112},
    )
    with TestClient(create_app(settings, factory), follow_redirects=False) as client:
        login(client, *ADMIN)
        html = client.get("/admin/settings").text
        api = client.get("/api/admin/settings").json()
    assert "WARDNODE" in html and "11112" in html and "Ward CXR node" in html
    assert "very-secret-session-key-of-32-chars" not in html and "very-secret-session-key-of-32-chars" not in str(api)
    assert api["web"]["secret_key"] == "**********"
    assert "<form" not in html.split("<main ")[1].split("</main>")[0]  # nothing to submit
    # psycopg also takes the password (and a client key's) in the query, which needs no percent-encoding
    # of its characters; the page showed it there (review)
    for url, shown in (
        ("postgresql+psycopg://cxr:pg-password@db/cxr", "postgresql+psycopg://cxr:***@db/cxr"),
        ("postgresql+psycopg://cxr@db/cxr?password=pg-password&sslmode=require&sslpassword=pg-password",
         "postgresql+psycopg://cxr@db/cxr?password=***&amp;sslmode=require&amp;sslpassword=***"),
    ):
        pg = Settings(node={"data_dir": tmp_path / "var"}, database={"url": url})
        with TestClient(create_app(pg, factory), follow_redirects=False) as client:
            login(client, *ADMIN)
            html = client.get("/admin/settings").text
        assert "pg-password" not in html and shown in html


def test_audit_log_lists_and_filters_events(admin_client: tuple[TestClient, str]) -> None:
    client, csrf = admin_client
    client.post("/admin/aes", data={"csrf_token": csrf, "role": "caller", "ae_title": "CT01"})
    html = client.get("/admin/audit").text
    assert "ae.add" in html and "user.login" in html and "user:alice" in html
    filtered = client.get("/admin/audit", params={"action": "ae."}).text
    assert "ae.add" in filtered and ">user.login<" not in filtered
    api = client.get("/api/admin/audit", params={"action": "ae."}).json()
    assert api["total"] == 1 and api["events"][0]["details"]["ae_title"] == "CT01"
    assert api["events"][0]["at"].endswith("Z")


def _events(factory: sessionmaker[Session], count: int) -> None:
    """``count`` events, three actors in turn, two by two at the same instant (the order's ties)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    actors = ("user:alice", "cli:root", "system")
    with session_scope(factory) as s:
        s.add_all(AuditEvent(at=start + timedelta(minutes=n // 2), actor=actors[n % 3], action="study.view",
                             target=f"study:{n}", details={}) for n in range(count))


def test_the_audit_log_pages_by_key_as_its_links_go(db: sessionmaker[Session]) -> None:
    """A late page of the audit log counted past every event before it (OFFSET); the pager's links now
    seek the next page from this page's last event (and the previous from its first), on each database,
    and give the same pages as counting did, ties of time included."""
    _events(db, 125)

    def page(number: int, **seek: int) -> admin.AuditPage:
        with session_scope(db) as s:
            return admin.audit_page_data(s, page=number, action="", actor="", per_page=20, **seek)

    counted = walk_by_links(page, lambda p: [e.id for e in p.events], 7)
    assert sum(map(len, counted)) == 125 and len(counted[-1]) == 5


def test_the_audit_log_filters_the_actor_from_its_start_or_its_name(db: sessionmaker[Session]) -> None:
    _events(db, 30)

    def actors(actor: str) -> set[str]:
        with session_scope(db) as s:
            return {e.actor for e in admin.audit_page_data(s, page=1, action="", actor=actor).events}

    assert actors("ali") == {"user:alice"}
    assert actors("user:al") == {"user:alice"}
    assert actors("root") == actors("cli:") == {"cli:root"}
    assert actors("sys") == {"system"}
    assert actors("lice") == set() and actors("%") == set()  # from the start; LIKE's % is literal


def test_the_audit_log_says_more_than_the_cap_and_its_links_seek(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = admin_client
    _events(factory, 140)
    monkeypatch.setattr(paging, "COUNT_CAP", 100)
    html = client.get("/admin/audit").text
    assert "More than 100 events, newest first." in html and "Page 1</span>" in html
    older = re.search(r'href="/admin/audit\?(page=2&amp;before=\d+)">Older', html)
    assert older, html
    html = client.get(f"/admin/audit?{older.group(1).replace('&amp;', '&')}").text
    assert "Page 2</span>" in html and re.search(r'href="/admin/audit\?page=1">‹ Newer', html)
    api = client.get("/api/admin/audit").json()
    assert (api["total"], api["total_capped"], api["more"]) == (100, True, True)
    for url in ("/admin/audit", "/api/admin/audit"):  # past 64 bits: invalid input, not a driver overflow
        assert client.get(url, params={"before": str(2**64)}).status_code == 422
    monkeypatch.setattr(paging, "COUNT_CAP", 1000)
    html = client.get("/admin/audit", params={"actor": "root"}).text
    assert "47 events, newest first." in html and "Page 1 of 1" not in html  # one page: no pager


def test_sessions_table_does_not_keep_expired_rows(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    from datetime import datetime, timedelta

    login(client, *RADIOLOGIST)
    with session_scope(factory) as s:
        s.scalars(select(WebSession)).one().expires_at = datetime.now(UTC) - timedelta(days=1)
    login(client, *ADMIN)
    with session_scope(factory) as s:
        assert len(s.scalars(select(WebSession)).all()) == 1


def test_remote_ae_rows_are_the_shared_registry(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    """The console writes the same rows the C-STORE listener consults (dicom_node.aes)."""
    from dicom_node import aes

    client, csrf = admin_client
    client.post(
        "/admin/aes",
        data={"csrf_token": csrf, "role": "caller", "ae_title": "XR01", "host": "10.1.1.1", "enabled": "1"},
    )
    with session_scope(factory) as s:
        assert aes.caller_allowed(s, "XR01", "10.1.1.1")
        assert not aes.caller_allowed(s, "XR01", "10.1.1.2")
        assert aes.find(s, "XR01", AeRole.CALLER) is not None


def test_a_user_that_does_not_exist_is_not_found_on_the_user_forms(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    """Disabling or setting the password of a user id that names no one (a stale page, a typed URL) was
    answered 409 "conflict" and 422 "invalid input"; it is 404, as for an AE and in the API."""
    client, csrf = admin_client
    with session_scope(factory) as s:
        missing = (s.scalar(select(func.max(User.id))) or 0) + 1
    disable = client.post(f"/admin/users/{missing}/active", data={"csrf_token": csrf, "active": "0"})
    reset = client.post(
        f"/admin/users/{missing}/password",
        data={"csrf_token": csrf, "password": "tulip-river-lamp", "password_repeat": "tulip-river-lamp"},
    )
    for response in (disable, reset):
        assert response.status_code == 404 and f"no user with id {missing}" in response.text
    api = client.patch(f"/api/admin/users/{missing}", json={"active": False}, headers={"X-CSRF-Token": csrf})
    assert api.status_code == 404


def test_the_audit_log_shows_the_letters_of_its_details_not_json_escapes(
    admin_client: tuple[TestClient, str]
) -> None:
    """A search for MÜLLER was listed as {"patient": "M\\u00fcller"}: the details were JSON with every letter
    beyond ASCII escaped, unreadable for a name in Greek or Japanese. Markup stays escaped."""
    client, _ = admin_client
    assert client.get("/results", params={"patient": "Müller 山田 <b>"}).status_code == 200
    html = client.get("/admin/audit", params={"action": "results.search"}).text
    assert "Müller 山田" in html and "\\u00fc" not in html
    assert "<b>" not in html
