"""``python -m privenc`` (also what ``torchrun -m privenc`` runs)."""

from privenc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
