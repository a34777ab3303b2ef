"""Vision-language models the MiMo-VL way: a Qwen2.5-VL-architecture model (`model.py`), its processor
(`processor.py`), image decoding and geometry (`images.py`), and generation behind the engine's `Backend`
contract (`backend.py`). Tasks live in `thinkforge.tasks.vision`, rewards in `thinkforge.rewards.vision`,
training in `thinkforge.train.vl_pretrain` and the shared RL stack."""
