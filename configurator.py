"""
`--key=value` overrides for the plain config values at the top of each script (nanoGPT style, no exec), and
recipe files: `python train_grpo.py config/r1zero_qwen2.5_0.5b_gsm8k.py --lr=2e-6` applies the recipe, then the
overrides, in the order given.

    cfg = parse_overrides(sys.argv[1:], {"lr": 1e-3, "batch_size": 8, "out_dir": "out", "eval": False})
    cfg = parse_overrides([], defaults, {"lr": 2e-5})   # from code: keyword values, checked like a recipe's

Each value is parsed as the type of its default: an int accepts 1e4 but not 0.5, a bool accepts 0/1/true/false
or a bare `--key`, a str is taken as is (so `--prompt=123` stays the text "123").
A recipe is a Python file of `key = literal` lines (comments allowed). It is parsed, never executed: each value
must be a literal (number, string, bool) of its key's type.
"""
import ast


def parse_overrides(argv, defaults, overrides=None):
    """A copy of `defaults` with every recipe file and `--key=value` of argv applied, then the `overrides` dict (values
    of their keys' types, as in a recipe). Bad arguments exit with a message."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") and arg.endswith(".py"):
            cfg.update(read_recipe(arg, cfg))
            continue
        if not arg.startswith("--"):
            raise SystemExit(f"bad argument {arg!r}: expected --key=value or a config/NAME.py recipe")
        key, sep, val = arg[2:].partition("=")
        if key not in cfg:
            raise SystemExit(f"unknown option --{key}; options: {', '.join('--' + k for k in cfg)}")
        kind = type(cfg[key])
        if not sep:
            if kind is not bool:
                raise SystemExit(f"bad argument {arg!r}: expected --{key}=value")
            val = "1"
        cfg[key] = _parse(key, val, kind)
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise SystemExit(f"unknown option {key!r}; options: {', '.join(cfg)}")
        cfg[key] = _typed(key, value, type(defaults[key]), f"{key}={value!r}")
    return cfg


def _parse(key, val, kind):
    try:
        if kind is bool:
            if val.lower() in ("1", "true"):
                return True
            if val.lower() in ("0", "false"):
                return False
            raise ValueError
        if kind is int:
            f = float(val)
            if not f.is_integer():
                raise ValueError
            return int(f)
        return kind(val)
    except ValueError:
        raise SystemExit(f"--{key}={val}: expected {kind.__name__}") from None


def read_recipe(path, defaults):
    """{key: value} of a recipe file; errors name path:line and what was expected."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read recipe ({e.strerror})") from None
    except SyntaxError as e:
        raise SystemExit(f"{path}:{e.lineno}: not a recipe of key = value lines ({e.msg})") from None
    out = {}
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SystemExit(f"{where}: expected a `key = value` line")
        key = node.targets[0].id
        if key not in defaults:
            raise SystemExit(f"{where}: unknown option {key!r}; options: {', '.join(defaults)}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise SystemExit(f"{where}: {key} must be a literal value (number, string, bool)") from None
        out[key] = _typed(key, value, type(defaults[key]), f"{where}: {key} = {value!r}")
    return out


def _typed(key, value, kind, where):
    """value as kind (an int is a float too; 0/1 a bool), else exit naming where it came from."""
    if kind is float and type(value) is int:
        value = float(value)
    elif kind is bool and value in (0, 1):
        value = bool(value)
    if type(value) is not kind:
        raise SystemExit(f"{where}: expected {kind.__name__}")
    return value
