"""Secret hygiene in infra/: a scanner for secret-looking values (checked on planted ones), Secrets only as
placeholder templates, sensitive environment variables only from secretKeyRef."""
from __future__ import annotations

import json
import re

from tests.e2e.infra.helpers import (
    INFRA,
    ROOT,
    TEMPLATE,
    all_objects,
    walk,
)

PLACEHOLDER = "REPLACE_ME"
SECRET_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("credentials in a URL", re.compile(r"[a-z0-9+]+://[^/\s:@'\"]+:(?P<v>[^@\s'\"/]+)@")),
    ("secret assignment", re.compile(
        r"(?i)\b[\w.-]*(password|passwd|secret[_-]?access[_-]?key|secret[_-]?key|api[_-]?key|token|auth[_-]?string)"
        r"[\w.-]*['\"]?\s*[:=]\s*(?P<q>['\"]?)(?P<v>[^\s'\",}]+)")),
]
NOT_A_VALUE = re.compile(r"(?i)^(true|false|null|none|\d+|[{\[(|>]|\.\.\.)$")


def _is_placeholder(value: str) -> bool:
    return PLACEHOLDER in value or value.startswith(("$(", "${", "{{", "<")) or bool(NOT_A_VALUE.match(value))


def secret_findings(text: str, source: str, code: bool = False) -> list[str]:
    """Lines that look like they hold a secret value. In code (``code=True``) only quoted literals count: a
    name (``secret_key=secret``) is a variable, not a value."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, rx in SECRET_PATTERNS:
            for m in rx.finditer(line):
                if "v" in rx.groupindex and _is_placeholder(m.group("v")):
                    continue
                if code and what == "secret assignment" and not m.group("q"):
                    continue
                out.append(f"{source}:{lineno}: {what}: {line.strip()[:120]}")
    return out


def test_secret_scanner_finds_planted_secrets():
    fake_key_id = "AKIA" + "IOSFODNN7EXAMPLE"   # AWS's documentation example, assembled so no scanner trips here
    planted = (f"aws_access_key_id = {fake_key_id}\nPOSTGRES_PASSWORD: hunter2\n"
               "url: postgresql://keel:s3cr3t@db:5432/x\nAWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\n")
    found = secret_findings(planted, "planted")
    assert [f.split(": ")[1] for f in found] == ["AWS access key id", "secret assignment", "credentials in a URL",
                                                 "secret assignment"], found
    fine = ("POSTGRES_PASSWORD: REPLACE_ME\nvalue: postgresql://keel:$(POSTGRES_PASSWORD)@db:5432/x\n"
            "password: {{ password }}\nautomountServiceAccountToken: false\n\"secretKeyRef\": {\n")
    assert secret_findings(fine, "fine") == []
    code = ('client(aws_secret_access_key=secret)\napi_key = "sk-live-0123456789"\n'
            'URI = "postgresql://keel:s3cr3t@db/x"\n')
    assert [f.split(": ")[1] for f in secret_findings(code, "x.py", code=True)] == ["secret assignment",
                                                                                   "credentials in a URL"]


def test_no_secret_values_anywhere_in_infra():
    findings = []
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        findings += secret_findings(path.read_text(errors="replace"), str(path.relative_to(ROOT)),
                                    code=path.suffix == ".py")
    assert not findings, "\n".join(findings)


def test_secrets_are_templates_with_placeholders_only():
    for path, doc in all_objects():
        if doc["kind"] != "Secret":
            continue
        rel = path.relative_to(ROOT)
        assert path.parent.name == "secrets" and path.name.endswith(".template.yaml"), f"{rel}: a Secret outside secrets/"
        assert "data" not in doc, f"{rel}: use stringData placeholders, not base64 data"
        for key, value in doc["stringData"].items():
            assert PLACEHOLDER in value, f"{rel}: {doc['metadata']['name']}.{key} is not a placeholder"


def test_sensitive_environment_variables_come_from_secrets():
    template = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]
    sources = [(str(p.relative_to(ROOT)), d) for p, d in all_objects()] + [(TEMPLATE.name, template)]
    sensitive = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
    checked = 0
    for source, doc in sources:
        for _, node in walk(doc):
            if "name" in node and ("value" in node or "valueFrom" in node) and sensitive.search(str(node["name"])):
                checked += 1
                assert "secretKeyRef" in node.get("valueFrom", {}), f"{source}: {node['name']} is not a secretKeyRef"
        if doc.get("kind") == "ConfigMap":
            assert not [k for k in doc.get("data", {}) if sensitive.search(k)], f"{source}: secret-like key in ConfigMap"
    assert checked >= 8
