"""Templates: structured fields rendered into prompts (gateway/templates.toml)."""

from __future__ import annotations

import functools
import itertools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from videomesh.errors import InvalidArgument, NotFound
from videomesh.v1 import gateway_pb2

DEFAULT_FILE = Path(__file__).with_name("templates.toml")


@dataclass(frozen=True)
class Field:
    name: str
    description: str = ""
    required: bool = False
    choices: tuple[str, ...] = ()
    default: str = ""


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    description: str
    prompt: str
    fields: tuple[Field, ...]
    style: str = ""
    pregenerated: bool = False

    def render(self, values: dict[str, str]) -> str:
        known = {f.name for f in self.fields}
        unknown = sorted(set(values) - known)
        violations = [
            (f"fields.{k}", f"template {self.id!r} has no field {k!r}; fields: {', '.join(sorted(known))}")
            for k in unknown
        ]
        filled = {}
        for f in self.fields:
            v = values.get(f.name, "").strip() or f.default
            if not v and f.required:
                violations.append((f"fields.{f.name}", f"{f.name} is required"))
            elif f.choices and v not in f.choices:
                violations.append(
                    (f"fields.{f.name}", f"{f.name} must be one of {', '.join(f.choices)}; got {v!r}")
                )
            elif len(v) > 200:
                violations.append((f"fields.{f.name}", f"{f.name} is longer than 200 characters"))
            filled[f.name] = v
        if violations:
            raise InvalidArgument("; ".join(d for _, d in violations), violations=violations)
        return re.sub(r"\{(\w+)\}", lambda m: filled[m.group(1)], self.prompt)

    def public_prompts(self, limit: int = 4096) -> frozenset[str]:
        """Every rendering made only of the library's own words: each field a listed choice or its
        default. Only these may be shared between tenants in the result cache (a free-text field
        holds the tenant's words, e.g. an unreleased product's name)."""
        return _public_prompts(self, limit)

    def proto(self) -> gateway_pb2.Template:
        return gateway_pb2.Template(
            id=self.id, name=self.name, description=self.description, prompt=self.prompt, style=self.style,
            pregenerated=self.pregenerated,
            fields=[gateway_pb2.TemplateField(name=f.name, description=f.description, required=f.required,
                                              choices=list(f.choices), default=f.default) for f in self.fields],
        )  # fmt: skip


@functools.cache
def _public_prompts(t: Template, limit: int) -> frozenset[str]:
    options = []
    for f in t.fields:
        values = f.choices or ((f.default,) if f.default or not f.required else ())
        if not values:
            return frozenset()  # a required free-text field: every rendering holds the tenant's words
        options.append([(f.name, v) for v in values])
    out = set()
    for combo in itertools.islice(itertools.product(*options), limit):
        out.add(t.render(dict(combo)))
    return frozenset(out)


class TemplateLibrary:
    def __init__(self, templates: dict[str, Template]):
        self.templates = templates

    @classmethod
    def load(cls, path: Path | None = None) -> TemplateLibrary:
        data = tomllib.loads(Path(path or DEFAULT_FILE).read_text(encoding="utf-8"))
        out = {}
        for tid, t in data.items():
            fields = tuple(Field(f["name"], f.get("description", ""), f.get("required", False), tuple(f.get("choices", ())),
                                 f.get("default", "")) for f in t.get("fields", []))  # fmt: skip
            missing = set(re.findall(r"\{(\w+)\}", t["prompt"])) - {f.name for f in fields}
            if missing:
                raise ValueError(f"template {tid!r}: placeholders without fields: {sorted(missing)}")
            out[tid] = Template(tid, t["name"], t.get("description", ""), t["prompt"], fields, t.get("style", ""),
                                t.get("pregenerated", False))  # fmt: skip
        return cls(out)

    def get(self, template_id: str) -> Template:
        if template_id not in self.templates:
            raise NotFound(
                f"template {template_id!r} not found; ListTemplates shows the library", field="template_id"
            )
        return self.templates[template_id]
