"""Server-side HTML: every value goes through :func:`esc` (the page is the only template).

A little JavaScript refreshes the live part of a page (``#live``) every two seconds unless
paused; everything works without it, forms included.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from .guard import CSRF_FIELD

__all__ = ["ago", "button", "esc", "link", "page", "table", "task_path"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#cfd8ff;text-decoration:none}header b{font-size:1.1em;margin-right:1em}
main{padding:1em 1.4em}h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:.6em}
th,td{border-bottom:1px solid #e2e5ea;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.SUCCESS{color:#17803d}.FAILURE{color:#c2261c}.RETRY{color:#b26b00}.REVOKED{color:#6b6f7a}
.STARTED,.RECEIVED,.PROGRESS{color:#1f5fbf}.off{color:#888}
.banner{background:#fff4d6;border:1px solid #e6c35c;padding:.5em .8em;margin:.6em 0}
.flash{background:#e3f4e8;border:1px solid #7cc48f;padding:.5em .8em;margin:.6em 0}
pre{background:#fff;border:1px solid #e2e5ea;padding:.6em;overflow:auto;max-height:30em}
form.inline{display:inline}button{cursor:pointer}
.bar{display:inline-block;height:.7em;background:#1f5fbf;vertical-align:middle}
.slots{display:inline-block;width:8em;background:#dfe4ee;vertical-align:middle}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:1.4em;border-left:1px solid #dfe4ee}
ul.tree{background:#fff;padding:.4em .4em .4em 1em;border:1px solid #e2e5ea}
ul.tree li{margin:.15em 0}ul.tree .kind{color:#555;font-style:italic}
ul.tree li.here>b{background:#fff4d6}
"""

_SCRIPT = """
(function(){
  var live=document.getElementById('live'),box=document.getElementById('pause');
  if(!live)return;
  setInterval(function(){
    if(box&&box.checked)return;
    fetch(location.href,{credentials:'same-origin'}).then(function(r){return r.text()})
    .then(function(t){
      var doc=new DOMParser().parseFromString(t,'text/html'),n=doc.getElementById('live');
      if(n){live.innerHTML=n.innerHTML;}
    }).catch(function(){});
  },2000);
})();
"""


def esc(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def ago(timestamp: float | None, now: float | None = None) -> str:
    if not timestamp:
        return "-"
    seconds = max((now or time.time()) - timestamp, 0.0)
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def task_path(task_id: str, action: str = "") -> str:
    """``/tasks/<id>[/action]`` with the id URL-quoted (ids are the sender's to choose)."""
    return f"/tasks/{quote(task_id, safe='')}" + (f"/{action}" if action else "")


def link(path: str, text: Any, **query: str) -> str:
    url = path + ("?" + urlencode({k: v for k, v in query.items() if v}) if query else "")
    return f'<a href="{esc(url)}">{esc(text)}</a>'


def button(action: str, label: str, csrf: str, confirm: str = "", **fields: str) -> str:
    """A one-button POST form carrying the CSRF token."""
    hidden = "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items()
    )
    ask = f' onsubmit="return confirm({esc(repr(confirm))})"' if confirm else ""
    return (
        f'<form class="inline" method="post" action="{esc(action)}"{ask}>'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{esc(csrf)}">{hidden}'
        f'<button type="submit" name="do" value="{esc(label)}">{esc(label)}</button></form>'
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """``rows`` hold HTML already escaped; a cell starting with ``\\x00n`` is right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{c[2:]}</td>' if c.startswith("\x00n") else f"<td>{c}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="off">{esc(empty)}</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def num(value: Any) -> str:
    """A right-aligned cell."""
    return "\x00n" + esc("-" if value is None else value)


def page(title: str, app_name: str, body: str, *, flash: str = "", live: bool = False) -> str:
    nav = " ".join(
        link(path, text)
        for path, text in (
            ("/", "Overview"),
            ("/tasks", "Tasks"),
            ("/dead-letters", "Dead letters"),
        )
    )
    pause = (
        '<label style="margin-left:auto"><input type="checkbox" id="pause"> pause refresh</label>'
        if live
        else ""
    )
    note = f'<div class="flash" role="status">{esc(flash)}</div>' if flash else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(title)} · aioqueue</title><style>{_STYLE}</style></head><body>"
        f"<header><b>aioqueue · {esc(app_name)}</b>{nav}{pause}</header>"
        f"<main>{note}{body}</main><script>{_SCRIPT}</script></body></html>"
    )
