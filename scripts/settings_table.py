"""Print the README's settings table from `server.settings.Settings` (one source of truth)."""

from __future__ import annotations

from server.settings import ENV_PREFIX, Settings

SECRET_FIELDS = ("api_keys", "admin_key")


def table() -> str:
    rows = ["| env var | CLI flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else "(see meaning)"
        if name == "store_url":
            default = "`file://~/.local/share/prefixserve`"
        elif default is None:
            default = "—"
        else:
            default = f"`{default}`"
        # secrets are never CLI flags (they would show in `ps`): environment only
        flag = "env only" if name in SECRET_FIELDS else "`--" + name.replace("_", "-") + "`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {flag} | {default} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
