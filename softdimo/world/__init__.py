"""The embedded shapes world: scenes, tokenizer, teachers, tiny CLIP, rewards and features.

Import-light on purpose: import the submodule you need (``softdimo.world.store.load_world``,
``softdimo.world.build.build_world``, ``softdimo.world.scenes``...); nothing heavy loads here.
"""
