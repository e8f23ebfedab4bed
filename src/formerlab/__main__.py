"""``python -m formerlab`` (what ``torchrun ... -m formerlab train CONFIG`` runs on each rank)."""

from formerlab.cli import app

if __name__ == "__main__":
    app(prog_name="formerlab")
