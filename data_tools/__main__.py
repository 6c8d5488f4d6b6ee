from data_tools.cli import main

# the guard matters: img2dataset spawns processes, which re-import this module as __mp_main__
if __name__ == "__main__":
    raise SystemExit(main())
