"""
`--key=value` overrides for the plain config values at the top of each script (nanoGPT style, no exec).

    cfg = parse_overrides(sys.argv[1:], {"lr": 1e-3, "batch_size": 8, "out_dir": "out", "eval": False})

Each value is parsed as the type of its default: an int accepts 1e4 but not 0.5, a bool accepts 0/1/true/false
or a bare `--key`, a str is taken as is (so `--prompt=123` stays the text "123").
"""


def parse_overrides(argv, defaults):
    """A copy of `defaults` with every `--key=value` of argv applied. Bad arguments exit with a message."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"bad argument {arg!r}: expected --key=value")
        key, sep, val = arg[2:].partition("=")
        if key not in cfg:
            raise SystemExit(f"unknown option --{key}; options: {', '.join('--' + k for k in cfg)}")
        kind = type(cfg[key])
        if not sep:
            if kind is not bool:
                raise SystemExit(f"bad argument {arg!r}: expected --{key}=value")
            val = "1"
        cfg[key] = _parse(key, val, kind)
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
