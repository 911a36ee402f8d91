//! The checks `terraform validate` makes, against the Google provider's schema as its cdktf
//! bindings publish it (a jsii assembly: every resource's arguments, nested blocks and
//! attributes, generated from the provider). No Terraform provider can be fetched on this
//! machine, so this is how the module meets the provider before it meets GCP: every argument
//! and block exists and has the right shape, every required one is set, and every reference
//! (`var.`, `local.`, `data.`, a resource's attribute) names something that exists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use hcl::{Block, Body};
use serde::Deserialize;

/// The arguments and nested blocks of one block type.
#[derive(Debug, Default)]
pub struct BlockSchema {
    /// Argument name → required.
    pub attributes: BTreeMap<String, bool>,
    /// Nested block name → (required, its schema).
    pub blocks: BTreeMap<String, (bool, BlockSchema)>,
}

/// A resource or data source: what it takes and what it exports.
#[derive(Debug, Default)]
pub struct Kind {
    pub args: BlockSchema,
    /// Every attribute a reference may read (arguments and computed ones).
    pub exported: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct Schema {
    pub resources: HashMap<String, Kind>,
    pub data_sources: HashMap<String, Kind>,
    pub provider: BlockSchema,
}

#[derive(Deserialize)]
struct Assembly {
    types: HashMap<String, TypeDef>,
}

#[derive(Deserialize)]
struct TypeDef {
    kind: String,
    #[serde(default)]
    datatype: bool,
    #[serde(default)]
    docs: Docs,
    #[serde(default)]
    properties: Vec<Property>,
}

#[derive(Default, Deserialize)]
struct Docs {
    #[serde(default)]
    summary: String,
    #[serde(default)]
    remarks: String,
}

#[derive(Deserialize)]
struct Property {
    name: String,
    #[serde(default)]
    optional: bool,
    #[serde(default, rename = "static")]
    is_static: bool,
    #[serde(default)]
    docs: Docs,
    #[serde(rename = "type")]
    ty: serde_json::Value,
}

/// Where the registry's documentation of a provider's resources starts in a link.
const DOCS: &str = "/docs/";

impl Schema {
    /// Reads the jsii assembly at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_jsii(&text)
    }

    /// The schema in a jsii assembly's text.
    pub fn from_jsii(text: &[u8]) -> Result<Self, String> {
        let asm: Assembly =
            serde_json::from_slice(text).map_err(|e| format!("not a jsii assembly: {e}"))?;
        let mut schema = Schema::default();
        for (fqn, t) in &asm.types {
            if t.kind != "class" {
                continue;
            }
            // "Represents a {@link https://…/docs/resources/pubsub_topic google_pubsub_topic}."
            let Some(link) = link(&t.docs.summary) else {
                continue;
            };
            let Some(config) = asm.types.get(&format!("{fqn}Config")) else {
                continue;
            };
            let args = block_schema(&asm, config, 0);
            let exported = t
                .properties
                .iter()
                .filter(|p| !p.is_static && !p.name.ends_with("Input"))
                .map(|p| snake(&p.name))
                .chain(args.attributes.keys().cloned())
                .collect();
            let kind = Kind { args, exported };
            let (url, name) = link;
            if url.contains("/docs/resources/") {
                schema.resources.insert(name, kind);
            } else if url.contains("/docs/data-sources/") {
                schema.data_sources.insert(name, kind);
            } else if url.ends_with("/docs") {
                schema.provider = kind.args;
            }
        }
        if schema.resources.is_empty() {
            return Err("the assembly describes no Terraform resources".into());
        }
        Ok(schema)
    }

    /// Every disagreement between the module's blocks and the schema, one line each.
    pub fn check(&self, module: &[Block]) -> Vec<String> {
        let mut errors = Vec::new();
        for b in module {
            let labels: Vec<&str> = b.labels.iter().map(|l| l.as_str()).collect();
            let (kinds, what) = match b.identifier.as_str() {
                "resource" => (&self.resources, "resource"),
                "data" => (&self.data_sources, "data source"),
                "provider" if labels == ["google"] => {
                    check_body(
                        &self.provider,
                        &b.body,
                        "provider.google",
                        false,
                        &mut errors,
                    );
                    continue;
                }
                _ => continue,
            };
            let [ty, name] = labels[..] else {
                errors.push(format!("{what} block with labels {labels:?}"));
                continue;
            };
            let at = format!("{ty}.{name}");
            match kinds.get(ty) {
                Some(k) => check_body(&k.args, &b.body, &at, true, &mut errors),
                None => errors.push(format!("{at}: no {what} {ty} in the google provider")),
            }
        }
        self.check_references(module, &mut errors);
        errors
    }

    fn check_references(&self, module: &[Block], errors: &mut Vec<String>) {
        let declared = |kind: &str, ty: &str, name: &str| {
            module.iter().any(|b| {
                b.identifier.as_str() == kind && b.labels.iter().map(|l| l.as_str()).eq([ty, name])
            })
        };
        let vars: BTreeSet<&str> = module
            .iter()
            .filter(|b| b.identifier.as_str() == "variable")
            .filter_map(|b| b.labels.first().map(|l| l.as_str()))
            .collect();
        let locals: BTreeSet<&str> = module
            .iter()
            .filter(|b| b.identifier.as_str() == "locals")
            .flat_map(|b| b.body.attributes().map(|a| a.key.as_str()))
            .collect();
        // What is wrong with a reference to `kind` `ty.name`, then `rest`, if anything.
        let reference = |k: &Kind, kind: &str, what: &str, [ty, name]: [&str; 2], rest: &[&str]| {
            if !declared(kind, ty, name) {
                return Some(format!("no {what} {ty}.{name} in the module"));
            }
            let attr = rest.first().filter(|a| !k.exported.contains(**a))?;
            Some(format!("{what} {ty} has no attribute {attr}"))
        };
        for b in module {
            let text = hcl::to_string(&b.body).unwrap_or_default();
            for chain in references(&text) {
                let parts: Vec<&str> = chain.split('.').collect();
                let problem = match parts[..] {
                    ["var", v, ..] if !vars.contains(v) => Some(format!("no variable {v}")),
                    ["local", l, ..] if !locals.contains(l) => Some(format!("no local {l}")),
                    ["data", ty, name, ref rest @ ..] => {
                        let k = self.data_sources.get(ty);
                        k.and_then(|k| reference(k, "data", "data source", [ty, name], rest))
                    }
                    [ty, name, ref rest @ ..] => {
                        let k = self.resources.get(ty);
                        k.and_then(|k| reference(k, "resource", "resource", [ty, name], rest))
                    }
                    _ => None,
                };
                if let Some(p) = problem {
                    let place = std::iter::once(b.identifier.as_str())
                        .chain(b.labels.iter().map(|l| l.as_str()))
                        .collect::<Vec<_>>()
                        .join(" ");
                    errors.push(format!("{place}: {chain}: {p}"));
                }
            }
        }
    }
}

/// The URL and text of a `{@link URL text}` in `s`.
fn link(s: &str) -> Option<(String, String)> {
    let start = s.rfind("{@link ")? + "{@link ".len();
    let end = start + s[start..].find('}')?;
    let (url, text) = s[start..end].split_once(' ')?;
    Some((url.to_owned(), text.to_owned()))
}

/// A property's Terraform name: the anchor of its documentation link (`…#machine_type`), else
/// its camel-case name in snake case.
fn tf_name(p: &Property) -> String {
    link(&p.docs.remarks)
        .filter(|(url, _)| url.contains(DOCS))
        .and_then(|(url, _)| url.split_once('#').map(|(_, a)| a.to_owned()))
        .unwrap_or_else(|| snake(&p.name))
}

fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Nested blocks deeper than this are not described (none of the module's go past 4).
const MAX_DEPTH: usize = 8;

fn block_schema(asm: &Assembly, t: &TypeDef, depth: usize) -> BlockSchema {
    let mut s = BlockSchema::default();
    for p in &t.properties {
        let name = tf_name(p);
        match nested(asm, &p.ty) {
            Some(inner) if depth < MAX_DEPTH => {
                s.blocks
                    .insert(name, (!p.optional, block_schema(asm, inner, depth + 1)));
            }
            Some(_) => {
                s.blocks.insert(name, (!p.optional, BlockSchema::default()));
            }
            None => {
                s.attributes.insert(name, !p.optional);
            }
        }
    }
    s
}

/// The block type a property's type holds, if it is a nested block (a struct of the provider,
/// alone, in a list, or in a union with `IResolvable`); `None` for a plain attribute.
fn nested<'a>(asm: &'a Assembly, ty: &serde_json::Value) -> Option<&'a TypeDef> {
    if let Some(fqn) = ty.get("fqn").and_then(|f| f.as_str()) {
        return asm.types.get(fqn).filter(|t| t.datatype);
    }
    if let Some(c) = ty.get("collection") {
        return c.get("elementtype").and_then(|e| nested(asm, e));
    }
    ty.get("union")?
        .get("types")?
        .as_array()?
        .iter()
        .find_map(|t| nested(asm, t))
}

/// Terraform's meta-arguments, valid in every resource and data block.
const META_ATTRIBUTES: &[&str] = &["count", "for_each", "depends_on", "provider"];
const META_BLOCKS: &[&str] = &["lifecycle", "provisioner", "connection"];

/// Checks `body` against `schema`; `top`: a resource or data block (meta-arguments allowed).
fn check_body(schema: &BlockSchema, body: &Body, at: &str, top: bool, errors: &mut Vec<String>) {
    for a in body.attributes() {
        let key = a.key.as_str();
        if schema.attributes.contains_key(key)
            || (top && META_ATTRIBUTES.contains(&key))
            // An object attribute of the plugin framework reads like a block in the bindings.
            || schema.blocks.contains_key(key)
        {
            continue;
        }
        errors.push(format!("{at}: no argument {key}"));
    }
    let mut seen = BTreeSet::new();
    for b in body.blocks() {
        let (key, content) = match b.identifier.as_str() {
            "dynamic" => {
                let Some(label) = b.labels.first() else {
                    errors.push(format!("{at}: dynamic block without a label"));
                    continue;
                };
                let content = b.body.blocks().find(|c| c.identifier.as_str() == "content");
                (label.as_str(), content.map(|c| &c.body))
            }
            id => (id, Some(&b.body)),
        };
        seen.insert(key);
        if top && META_BLOCKS.contains(&key) {
            continue;
        }
        match schema.blocks.get(key) {
            Some((_, inner)) => {
                if let Some(content) = content {
                    check_body(inner, content, &format!("{at} {key}"), false, errors);
                }
            }
            None if schema.attributes.contains_key(key) => {
                errors.push(format!("{at}: {key} is an argument, not a block"));
            }
            None => errors.push(format!("{at}: no block {key}")),
        }
    }
    for (name, required) in &schema.attributes {
        if *required && !body.attributes().any(|a| a.key.as_str() == name) {
            errors.push(format!("{at}: required argument {name} is missing"));
        }
    }
    for (name, (required, _)) in &schema.blocks {
        let set = seen.contains(name.as_str()) || body.attributes().any(|a| a.key.as_str() == name);
        if *required && !set {
            errors.push(format!("{at}: required block {name} is missing"));
        }
    }
}

/// The dotted names in HCL text that may be references (`var.x`, `a.b.c`), outside strings
/// except inside their `${…}`; comments are already gone (the text is `hcl::to_string`'s).
fn references(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    // Nesting: true for a string, false for an interpolation (or the top level).
    let mut stack = vec![false];
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    while i < b.len() {
        let in_string = stack.last().copied().unwrap_or(false);
        let c = b[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => {
                    stack.pop();
                }
                b'$' if b.get(i + 1) == Some(&b'{') => {
                    stack.push(false);
                    i += 1;
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => stack.push(true),
            b'{' => stack.push(false),
            b'}' if stack.len() > 1 => {
                stack.pop();
            }
            c if (c.is_ascii_alphabetic() || c == b'_') && (i == 0 || !ident(b[i - 1])) => {
                let start = i;
                while i < b.len()
                    && (ident(b[i])
                        || (b[i] == b'.'
                            && b.get(i + 1)
                                .is_some_and(|&n| n.is_ascii_alphabetic() || n == b'_')))
                {
                    i += 1;
                }
                let word = &text[start..i];
                if word.contains('.') {
                    out.push(word.to_owned());
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-resource assembly in the shape of the cdktf bindings.
    fn schema() -> Schema {
        let link = |path: &str, name: &str| {
            format!(
                "Represents a {{@link https://registry.terraform.io/providers/hashicorp/google/6.50.0/docs{path} {name}}}."
            )
        };
        let prop = |name: &str, tf: &str, optional: bool, ty: serde_json::Value| {
            serde_json::json!({
                "name": name, "optional": optional, "type": ty,
                "docs": {"remarks": format!("Docs at Terraform Registry: {{@link https://registry.terraform.io/providers/hashicorp/google/6.50.0/docs/resources/topic#{tf} Topic#{tf}}}")}
            })
        };
        let string = serde_json::json!({"primitive": "string"});
        let asm = serde_json::json!({"types": {
            "p.topic.Topic": {"kind": "class", "docs": {"summary": link("/resources/topic", "google_topic")},
                "properties": [{"name": "tfResourceType", "static": true, "type": string},
                               {"name": "effectiveLabels", "type": string},
                               {"name": "nameInput", "type": string}]},
            "p.topic.TopicConfig": {"kind": "interface", "datatype": true, "properties": [
                prop("name", "name", false, string.clone()),
                prop("labels", "labels", true, serde_json::json!({"collection": {"kind": "map", "elementtype": string}})),
                prop("retryPolicy", "retry_policy", true, serde_json::json!({"fqn": "p.topic.TopicRetryPolicy"})),
                prop("schema", "schema", false, serde_json::json!({"union": {"types": [{"fqn": "cdktf.IResolvable"}, {"collection": {"kind": "array", "elementtype": {"fqn": "p.topic.TopicSchema"}}}]}}))]},
            "p.topic.TopicRetryPolicy": {"kind": "interface", "datatype": true, "properties": [
                prop("minimumBackoff", "minimum_backoff", false, string.clone())]},
            "p.topic.TopicSchema": {"kind": "interface", "datatype": true, "properties": [
                prop("encoding", "encoding", true, string.clone())]},
            "p.project.DataProject": {"kind": "class", "docs": {"summary": link("/data-sources/project", "google_project")},
                "properties": [{"name": "number", "type": string}]},
            "p.project.DataProjectConfig": {"kind": "interface", "datatype": true, "properties": []},
        }});
        Schema::from_jsii(asm.to_string().as_bytes()).expect("schema")
    }

    fn module(text: &str) -> Vec<Block> {
        hcl::from_str::<Body>(text)
            .expect("hcl")
            .into_blocks()
            .collect()
    }

    #[test]
    fn the_bindings_read_as_arguments_blocks_and_exports() {
        let s = schema();
        let topic = &s.resources["google_topic"];
        assert_eq!(topic.args.attributes.get("name"), Some(&true));
        assert_eq!(topic.args.attributes.get("labels"), Some(&false));
        assert!(topic.args.blocks["retry_policy"].1.attributes["minimum_backoff"]);
        assert!(topic.args.blocks["schema"].0, "schema is a required block");
        assert!(topic.exported.contains("effective_labels"));
        assert!(topic.exported.contains("name"));
        assert!(!topic.exported.contains("name_input"));
        assert!(s.data_sources["google_project"].exported.contains("number"));
    }

    #[test]
    fn a_module_that_matches_has_no_errors() {
        let m = module(
            r#"
            variable "n" {}
            locals { l = "x" }
            data "google_project" "this" {}
            resource "google_topic" "t" {
              name       = "${var.n}-${local.l}-${data.google_project.this.number}"
              depends_on = [google_topic.u]
              retry_policy { minimum_backoff = "1s" }
              dynamic "schema" {
                for_each = [1]
                content { encoding = "JSON" }
              }
            }
            resource "google_topic" "u" {
              name = google_topic.t.effective_labels["a"]
              schema {}
              lifecycle { prevent_destroy = true }
            }
            "#,
        );
        assert_eq!(schema().check(&m), Vec::<String>::new());
    }

    #[test]
    fn every_kind_of_mistake_is_named() {
        let m = module(
            r#"
            resource "google_topic" "t" {
              nam = "x"
              labels { a = "b" }
              retry_policy { maximum_backoff = "1s" }
              schema { encodings = "JSON" }
              ref = "${var.missing} ${google_topic.t.nope} ${google_topic.gone.name}"
            }
            resource "google_queue" "q" {}
            "#,
        );
        let errors = schema().check(&m);
        for want in [
            "google_topic.t: no argument nam",
            "google_topic.t: labels is an argument, not a block",
            "google_topic.t retry_policy: no argument maximum_backoff",
            "google_topic.t retry_policy: required argument minimum_backoff is missing",
            "google_topic.t schema: no argument encodings",
            "google_topic.t: required argument name is missing",
            "google_queue.q: no resource google_queue in the google provider",
            "resource google_topic t: var.missing: no variable missing",
            "resource google_topic t: google_topic.t.nope: resource google_topic has no attribute nope",
            "resource google_topic t: google_topic.gone.name: no resource google_topic.gone in the module",
        ] {
            assert!(
                errors.iter().any(|e| e == want),
                "{want:?} not in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), 11, "{errors:#?}");
    }
}
