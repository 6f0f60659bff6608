"""The shapes world and the builtin models made from it: `world` renders and judges scenes,
`components` are the models' parts, `train` trains toy and toy-clip, `lora` toy-purple, `tasks`
toy-inpaint and toy-depth, and `build` writes every builtin model's shipped files."""
