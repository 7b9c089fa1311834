"""``python -m portico``: the same as the ``portico`` command."""

from portico.cli import main

if __name__ == "__main__":
    main()
