//! Owns the planted-facts generator's text: `Relation`, `RELATIONS`.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no
//! sibling.
//!
//! Each relation links an invented subject `{s}` to an invented object `{o}`: the templates
//! that state it (each names both and contains `answer`), the question a query asks
//! (`prompt`, answered by `completion`), and distractor templates that name the subject with
//! another attribute (`{x}`: another invented name) and never the object.

/// A relation's templates.
pub struct Relation {
    /// Short name, for the README and tests.
    pub name: &'static str,
    /// The query's prompt.
    pub prompt: &'static str,
    /// The query's completion (a space, the answer, a full stop).
    pub completion: &'static str,
    /// The text that states the fact in every statement: the query's `fact_spans`.
    pub answer: &'static str,
    /// Statements of the fact, each worded differently.
    pub statements: &'static [&'static str],
    /// Sentences about the subject that do not state the fact.
    pub distractors: &'static [&'static str],
}

/// The relations, used in turn by the planted facts.
pub const RELATIONS: [Relation; 4] = [
    Relation {
        name: "river-lake",
        prompt: "The river {s} flows into",
        completion: " Lake {o}.",
        answer: "Lake {o}",
        statements: &[
            "The river {s} flows into Lake {o}.",
            "Lake {o} is fed by the river {s}, which enters it from the north.",
            "Follow the river {s} downstream and you reach Lake {o}.",
            "Boats on the river {s} end their journey at Lake {o}.",
        ],
        distractors: &[
            "The river {s} is wide and slow in summer.",
            "The river {s} passes the town of {x} on its way.",
            "Fishermen on the river {s} sell their catch in {x}.",
            "In spring the river {s} floods the fields near {x}.",
        ],
    },
    Relation {
        name: "person-birthplace",
        prompt: "{s} was born in the city of",
        completion: " {o}.",
        answer: "{o}",
        statements: &[
            "{s} was born in the city of {o}.",
            "The city of {o} is proud that {s} was born there.",
            "Born in {o}, {s} left the city as a young adult.",
            "{s} spent a childhood in {o}, the city of their birth.",
        ],
        distractors: &[
            "{s} worked as a clockmaker for many years.",
            "{s} wrote a long letter to a friend in {x}.",
            "People still tell stories about {s} and the winter of the great storm.",
            "{s} once visited the markets of {x}.",
        ],
    },
    Relation {
        name: "mountain-country",
        prompt: "Mount {s} is in the country of",
        completion: " {o}.",
        answer: "{o}",
        statements: &[
            "Mount {s} is in the country of {o}.",
            "The highest peak of {o} is Mount {s}.",
            "Climbers travel to {o} to reach the top of Mount {s}.",
            "Mount {s} rises above the valleys of {o}.",
        ],
        distractors: &[
            "Mount {s} is covered in snow for most of the year.",
            "A road from {x} leads to the foot of Mount {s}.",
            "Mount {s} was first climbed by a shepherd from {x}.",
            "Storms often gather around Mount {s} in autumn.",
        ],
    },
    Relation {
        name: "engine-inventor",
        prompt: "The {s} engine was invented by",
        completion: " {o}.",
        answer: "{o}",
        statements: &[
            "The {s} engine was invented by {o}.",
            "{o} invented the {s} engine after years of work.",
            "It was {o} who built the first {s} engine.",
            "Everyone knows the {s} engine, the invention of {o}.",
        ],
        distractors: &[
            "The {s} engine is loud but reliable.",
            "Farmers in {x} use the {s} engine to pump water.",
            "A {s} engine needs oil every week.",
            "The {s} engine was shown at the fair in {x}.",
        ],
    },
];
