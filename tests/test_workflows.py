"""Every workflow in workflows/ against the node definitions: our nodes from their INPUT_TYPES, the stock ComfyUI
nodes they use from the table below (ComfyUI 0.3.64). Node types, link types, required sockets, widget counts and
ranges, and the model file names the README documents."""

from __future__ import annotations

import json

import pytest

from comfy_stubs import ROOT, comfy_host, load_pack  # noqa: F401

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
FILE = "FILE"  # a model-file combo: any name the user has (lists differ per machine)
MODEL_FILES = {"CLIPLoader": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "VAELoader": "wan_2.1_vae.safetensors",
               "HiStreamLoader": "self_forcing_dmd.pt"}

# type: (required sockets, optional sockets, widgets [(name, spec)], output types); as ComfyUI 0.3.64 defines them.
STOCK = {
    "CLIPLoader": ({}, {}, [("clip_name", FILE), ("type", ["stable_diffusion", "stable_cascade", "sd3",
                    "stable_audio", "mochi", "ltxv", "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace",
                    "omnigen2", "qwen_image", "hunyuan_image"]), ("device", ["default", "cpu"])], ["CLIP"]),
    "CLIPTextEncode": ({"clip": "CLIP"}, {}, [("text", ("STRING",))], ["CONDITIONING"]),
    "VAELoader": ({}, {}, [("vae_name", FILE)], ["VAE"]),
    "CreateVideo": ({"images": "IMAGE"}, {"audio": "AUDIO"}, [("fps", ("FLOAT", 1.0, 120.0))], ["VIDEO"]),
    "SaveVideo": ({"video": "VIDEO"}, {}, [("filename_prefix", ("STRING",)), ("format", ["auto", "mp4"]),
                                           ("codec", ["auto", "h264"])], []),
    "PreviewImage": ({"images": "IMAGE"}, {}, [], []),
    "Note": ({}, {}, [("text", ("STRING",))], []),
}
CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"]


def our_definitions():
    """Our nodes in the table's form, from their INPUT_TYPES (needs the stubbed folder_paths)."""
    table = {}
    for node_type, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        schema = cls.INPUT_TYPES()
        sockets = {"required": {}, "optional": {}}
        widgets = []
        for section in ("required", "optional"):
            for name, spec in schema.get(section, {}).items():
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if isinstance(kind, list):
                    widgets.append((name, FILE if name == "ckpt_name" else kind))
                elif kind in ("INT", "FLOAT"):
                    widgets.append((name, (kind, options["min"], options["max"], options.get("step", 1))))
                    if options.get("control_after_generate"):
                        widgets.append((f"{name} control", CONTROL_VALUES))
                elif kind in ("STRING", "BOOLEAN"):
                    widgets.append((name, (kind,)))
                else:
                    sockets[section][name] = kind
        table[node_type] = (sockets["required"], sockets["optional"], widgets, list(cls.RETURN_TYPES))
    return table


@pytest.fixture
def definitions(comfy_host):
    return {**STOCK, **our_definitions()}


def check_value(where: str, spec, value) -> None:
    if spec == FILE:
        assert isinstance(value, str) and value.endswith((".safetensors", ".pt", ".pth", ".sft")), where
    elif isinstance(spec, list):
        assert value in spec, f"{where}: {value!r} not in {spec}"
    elif spec[0] == "INT":
        _, low, high, step = spec
        assert isinstance(value, int) and low <= value <= high and (value - low) % step == 0, f"{where}: {value}"
    elif spec[0] == "FLOAT":
        assert isinstance(value, (int, float)) and spec[1] <= value <= spec[2], f"{where}: {value}"
    elif spec[0] == "BOOLEAN":
        assert isinstance(value, bool), where
    else:
        assert isinstance(value, str), where


def test_the_documented_workflows_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"histream_1080p.json", "histream_plus_1080p.json", "ablation_histream_vs_self_forcing.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_fits_the_node_definitions(definitions, path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    nodes = {node["id"]: node for node in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in wf["links"]}
    assert wf["last_link_id"] >= max(links)

    for node in wf["nodes"]:
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert node["type"] in definitions, f"{where}: unknown node type"
        required, optional, widgets, outputs = definitions[node["type"]]
        assert [o["type"] for o in node["outputs"]] == outputs, where
        values = node.get("widgets_values", [])
        assert len(values) == len(widgets), f"{where}: {len(values)} widget values for {[w[0] for w in widgets]}"
        for (name, spec), value in zip(widgets, values):
            check_value(f"{where} {name}", spec, value)
        inputs = {i["name"]: i for i in node["inputs"]}
        for name, item in inputs.items():
            assert item["type"] == {**required, **optional}[name], f"{where} input {name}"
            if item["link"] is not None:
                link = links[item["link"]]
                assert (link[3], node["inputs"].index(item), link[5]) == (node["id"], link[4], item["type"]), where
        for name in required:
            assert inputs.get(name, {}).get("link") is not None, f"{where}: required input {name} is not connected"
        if node["type"] in MODEL_FILES:
            assert values[0] == MODEL_FILES[node["type"]], where
        if node["type"] == "CLIPLoader":
            assert values[1] == "wan", where

    for link_id, origin, slot, target, target_slot, kind in wf["links"]:
        output = nodes[origin]["outputs"][slot]
        assert output["type"] == kind and link_id in output["links"], f"{path.name} link {link_id}"
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, f"{path.name} link {link_id}"


def test_every_mode_has_a_workflow(comfy_host):
    modes = load_pack().NODE_CLASS_MAPPINGS["HiStreamDualResSampler"].INPUT_TYPES()["required"]["mode"][0]
    used = {node["widgets_values"][3] for path in WORKFLOWS for node in json.loads(path.read_text())["nodes"]
            if node["type"] == "HiStreamDualResSampler"}
    assert used == set(modes)
