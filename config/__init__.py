"""
config/: plain Python settings files, and here, the two rules every script follows: how
it reads its settings (configure, check), and how it writes a file (atomic_write).
Settings are module-level globals with defaults, as in nanoGPT:

    python train.py config/tinystories.py --max_steps=2000 --compile   # then --key=value overrides
    python sample.py --top_p 0.9                                        # --key value works the same

configure(globals()) runs the config file (plain Python: its lowercase assignments are
settings), then applies the command line. Values parse as Python literals and must have
their default's type; an unknown key, a wrong type or a flag without a value stops
with one line that names it. Each script then checks the ranges of its own settings
with check(). Every file a script writes (tokenizers, shards, meta.json, checkpoints,
exports) goes through atomic_write, so a file that exists is whole.
Read next: bpe.py, the tokenizer; then prepare.py, the first script with settings.
"""
import ast
import contextlib
import difflib
import os
import sys

SIMPLE = (bool, int, float, str, tuple, list, type(None))  # the types a setting can have


def setting_names(namespace):
    """A script's settings: its lowercase globals of simple types (their values are the defaults)."""
    return {k: v for k, v in namespace.items() if k.islower() and not k.startswith("_") and isinstance(v, SIMPLE)}


def _parse(text, default):
    """A command-line value for a setting with this default: strings stay as typed."""
    if isinstance(default, str):
        return text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            return float(text)  # inf and nan
        except ValueError:
            return text  # a string: the type check says if that is wrong


def _typed(key, value, default, where):
    """value, converted to the default's type, or an error naming the setting."""
    if isinstance(default, float) and type(value) is int and abs(value) < 2 ** 1000:
        value = float(value)
    if default is None:  # None means "decide for me" (auto); such a setting is an on/off switch
        ok = value is None or isinstance(value, bool)
    else:
        ok = type(value) is type(default) or (isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)))
    if not ok:
        want = "True, False or None (auto)" if default is None else f"a {type(default).__name__} like its default {default!r}"
        raise SystemExit(f"error: setting {key!r} in {where} must be {want}, got {value!r}")
    return type(default)(value) if isinstance(default, (tuple, list)) else value


def _help(settings, keys):
    print((settings.get("__doc__") or "").strip() + "\n\nsettings (--key=value or --key value):")
    for k, v in keys.items():
        print(f"  --{k}={v!r}")
    raise SystemExit(0)


def configure(settings, argv=None, others=()):
    """Applies a config file and command-line overrides to a script's settings, in place.

    `settings` is the script's globals(). A first argument that does not start with "-" names
    a config file. Then --key=value or --key value; a bool setting may be given as just
    --key (True). One config file serves several scripts: `others` are keys it may hold for
    another script (True: any key), which are skipped. Returns the settings that the config
    file and the command line set, {key: value}; the rest keep their defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = setting_names(settings)
    if "--help" in argv or "-h" in argv:
        _help(settings, keys)
    updates = []  # (key, value, where it came from)
    if argv and not argv[0].startswith("-"):
        path, argv = argv[0], argv[1:]
        scope = run_config(path)
        # its imports, functions and UPPERCASE helpers are not settings
        updates += [(k, v, path) for k, v in setting_names(scope).items()
                    if k in keys or not (others is True or k in others)]
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not key:
            raise SystemExit(f"error: expected --key=value or --key value, got {arg!r} (a config file comes first)")
        if key not in keys:
            _unknown(key, keys, "the command line")
        if not eq and i < len(argv) and not argv[i].startswith("--"):
            text, i = argv[i], i + 1  # --key value
        elif not eq and (keys[key] is None or isinstance(keys[key], bool)):
            text = "True"  # --flag
        elif not eq:
            raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE or --{key} VALUE")
        updates.append((key, _parse(text, keys[key]), "the command line"))
    for key, value, where in updates:
        if key not in keys:
            _unknown(key, keys, where)
        settings[key] = _typed(key, value, keys[key], where)
    return {k: settings[k] for k, _, _ in updates}


def run_config(path):
    """A config file's globals, once it has run. It must be Python (.py): a YAML-like line,
    `n_layer: 2`, is valid Python that sets nothing, so it is an error here."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path} not found")
    if not path.endswith(".py"):
        raise SystemExit(f"error: config file {path}: config files are Python, named .py (n_layer = 2, one a line)")
    source = open(path, encoding="utf-8").read()
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise SystemExit(f"error: config file {path} failed: SyntaxError: {e}") from None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and node.value is None:
            name = ast.unparse(node.target)
            raise SystemExit(f"error: config file {path}, line {node.lineno}: `{name}: {ast.unparse(node.annotation)}` "
                             f"sets nothing (Python reads it as a type annotation); write {name} = ...")
    scope = {"__file__": path}
    try:
        exec(compile(tree, path, "exec"), scope)
    except Exception as e:
        raise SystemExit(f"error: config file {path} failed: {type(e).__name__}: {e}") from None
    return scope


def settings_in(script):
    """The settings that a script beside this folder declares, read from its source without
    running it: its module-level lowercase assignments. For a config file shared by
    scripts: a key that no script has is a typo."""
    tree = ast.parse(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script),
                          encoding="utf-8").read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name) and t.id.islower() and not t.id.startswith("_")}


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(sorted(keys))}"
    raise SystemExit(f"error: unknown setting {key!r} in {where}{hint}")


def check(rules):
    """Stops at the first (name, value, ok, allowed) whose ok is False, with one line naming
    the setting and what it allows: check([("micro_batch", 0, 0 >= 1, "an integer >= 1")])."""
    for name, value, ok, allowed in rules:
        if not ok:
            raise SystemExit(f"error: {name}={value!r}: it must be {allowed}")


# -----------------------------------------------------------------------------
# Files: written whole or not at all


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """with atomic_write(path) as f: ... writes to a temp file beside `path` and renames it
    into place only when the block finishes; on an error or Ctrl-C the temp file goes and
    `path` is left as it was. So a half-written file never looks complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave an empty file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
