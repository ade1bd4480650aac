# Puts the repository root on sys.path so tests import `utils`, `lib`, `refer`, ... as the scripts do.
