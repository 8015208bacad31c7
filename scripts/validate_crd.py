#!/usr/bin/env python3
"""Validates custom resources against their CustomResourceDefinition's openAPIV3Schema, as the
API server's structural-schema check does, and strictly: an unknown field is an error (as with
`kubectl apply --validate=strict`), not silently pruned.

Usage: scripts/validate_crd.py CRD.yaml OBJECT.(yaml|json) [OBJECT ...]
Exits 1 and prints every error (with its JSON path) when an object does not validate.
Needs jsonschema and PyYAML (both come with kubernetes-validate in .venv, `make test-deps`).
Not checked: the CEL rules (x-kubernetes-validations), which only an API server evaluates.
"""
import copy
import json
import re
import sys

import jsonschema
import yaml

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def strict(schema):
    """The schema with unknown fields forbidden wherever the CRD lists the fields."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def load_objects(path):
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        return [json.loads(text)]
    return [d for d in yaml.safe_load_all(text) if d]


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        crd = yaml.safe_load(f)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    versions = {f"{group}/{v['name']}": v for v in crd["spec"]["versions"] if v.get("served")}
    failures = 0
    for path in argv[2:]:
        for obj in load_objects(path):
            if obj.get("kind") != kind:
                continue
            name = obj.get("metadata", {}).get("name", "?")
            version = versions.get(obj.get("apiVersion"))
            errors = []
            if version is None:
                errors.append(f"apiVersion {obj.get('apiVersion')} is not served (served: {sorted(versions)})")
            else:
                schema = strict(version["schema"]["openAPIV3Schema"])
                v = jsonschema.Draft7Validator(schema)
                for e in sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path)):
                    where = ".".join(str(p) for p in e.absolute_path) or "(root)"
                    errors.append(f"{where}: {e.message}")
            md = obj.get("metadata", {})
            if not DNS_SUBDOMAIN.match(name) or len(name) > 63:
                errors.append(f"metadata.name {name!r} is not a DNS label of at most 63 characters")
            for k, val in (md.get("labels") or {}).items():
                if not isinstance(val, str) or len(val) > 63:
                    errors.append(f"metadata.labels.{k}: {val!r} is not a label value")
            status = "OK" if not errors else f"{len(errors)} error(s)"
            print(f"{path}: {kind} {name} ({obj.get('apiVersion')}): {status}")
            for e in errors[:50]:
                print(f"  {e}")
            failures += bool(errors)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
