"""The engine: the model thread, its decode loop, and everything that loop owns."""
