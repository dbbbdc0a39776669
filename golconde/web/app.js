/* Golconde "Realtime Activity" page (golconde/web/index.html).
 *
 * Every second: GET ./stats (counters, states, backlog, lag of every listener thread) and
 * GET ./health; once: GET ./config (secrets removed by the server). Rates are the difference of two
 * successive snapshots divided by the time between them. Charts are uPlot (vendor/), keeping the
 * last WINDOW samples. Every value from the server is inserted with textContent, never as HTML.
 *
 * window.golconde exposes the page's state (cards by thread name, each with its uPlot charts, and
 * the number of polls) for tests and for the curious.
 */
"use strict";
(function () {
  var WINDOW = 120;          // samples kept per chart (about two minutes)
  var POLL_MS = 1000;
  var ACTIONS = ["add", "set", "update", "delete"];
  var COLORS = {add: "#2f9e44", set: "#1971c2", update: "#f08c00", "delete": "#c92a2a",
                errors: "#c92a2a", dead: "#862e9c", retried: "#f08c00",
                backlog: "#1971c2", lag: "#e8590c"};
  var main = document.getElementById("destinations");
  var statusLine = document.getElementById("status");
  var healthBadge = document.getElementById("health");
  var healthReasons = document.getElementById("health-reasons");
  var config = null;         // GET /config, once loaded
  var groups = Object.create(null);   // destination name -> {root, summary, list} (no prototype: any name)
  var cards = Object.create(null);    // thread name -> card (see makeCard; "__proto__" too)
  var page = window.golconde = {cards: cards, polls: 0, errors: 0};

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function fmtSeconds(value) {
    if (value === null || value === undefined) { return "-"; }
    if (value < 1) { return (value * 1000).toFixed(1) + " ms"; }
    if (value < 120) { return value.toFixed(2) + " s"; }
    return (value / 60).toFixed(1) + " min";
  }

  function fmtRate(value) {
    return (value === null || value === undefined || isNaN(value)) ? "-" : value.toFixed(1);
  }

  function own(object, key) { return object && Object.prototype.hasOwnProperty.call(object, key); }

  /* "up" when broker and database are connected, "connecting" while either connects, else "down"
   * (disconnected, or stopped). */
  function listenerState(stats) {
    if (stats.broker === "connected" && stats.database === "connected") { return "up"; }
    var states = [stats.broker, stats.database];
    if (states.indexOf("stopped") < 0 && states.indexOf("disconnected") < 0) { return "connecting"; }
    return "down";
  }

  function targetName(name, stats) {
    var prefix = stats.destination + "_";
    return stats.role === "target" && name.indexOf(prefix) === 0 ? name.slice(prefix.length) : name;
  }

  function listenerConfig(name, stats) {
    if (!config || !own(config.Destinations, stats.destination)) { return null; }
    var destination = config.Destinations[stats.destination];
    if (stats.role !== "target") { return destination; }
    var target = targetName(name, stats);
    return own(destination.Targets, target) ? destination.Targets[target] : null;
  }

  function series(label, color, extra) {
    var result = {label: label, stroke: color, width: 1.5, spanGaps: false,
                  value: function (u, v) { return v === null || v === undefined ? "-" : v.toFixed(1); }};
    Object.keys(extra || {}).forEach(function (key) { result[key] = extra[key]; });
    return result;
  }

  function makeChart(box, width, seriesList, scales, axes) {
    var data = [[]];
    seriesList.forEach(function () { data.push([]); });
    var chart = new uPlot({
      width: width, height: 110, series: [{}].concat(seriesList), scales: scales || {x: {time: true}},
      axes: axes || [{size: 28}, {size: 48}], legend: {live: false}, cursor: {drag: {x: false, y: false}}
    }, data, box);
    return chart;
  }

  function group(destination) {
    if (own(groups, destination)) { return groups[destination]; }
    var root = el("section", "destination");
    root.setAttribute("data-destination", destination);
    root.appendChild(el("h2", null, destination));
    var item = {root: root, summary: root.appendChild(el("div", "summary")),
                list: root.appendChild(el("div", "listeners"))};
    groups[destination] = item;
    main.appendChild(root);
    return item;
  }

  function makeCard(name, stats) {
    var card = {name: name, root: el("article", "listener"), figures: {}, data: {}};
    card.root.setAttribute("data-thread", name);
    var title = card.root.appendChild(el("h3"));
    title.appendChild(el("span", null, stats.role === "target" ? targetName(name, stats) : name));
    title.appendChild(el("span", "role", stats.role === "target"
      ? "target of " + stats.destination + " (" + name + ")" : "destination"));
    card.stateBadge = title.appendChild(el("span", "badge state"));
    var states = card.root.appendChild(el("div", "states"));
    card.broker = states.appendChild(el("span", "badge"));
    states.appendChild(document.createTextNode(" "));
    card.database = states.appendChild(el("span", "badge"));
    var figures = card.root.appendChild(el("div", "figures"));
    [["received", "received/s"], ["applied", "applied/s"], ["backlog", "backlog"], ["lag", "lag"],
     ["total", "applied"], ["errors", "errors"], ["dead", "dead letters"], ["retried", "retries"],
     ["unmatched", "unmatched"]
    ].forEach(function (pair) {
      var cell = figures.appendChild(el("div", null, pair[1]));
      card.figures[pair[0]] = cell.appendChild(el("b", null, "-"));
    });
    card.error = card.root.appendChild(el("div", "error"));
    group(stats.destination).list.appendChild(card.root);
    var width = Math.max(card.root.clientWidth - 26, 280);
    card.root.appendChild(el("div", "chart-title", "packets/s by action"));
    card.rates = makeChart(card.root.appendChild(el("div", "chart rates")), width,
      ACTIONS.map(function (a) { return series(a, COLORS[a]); }));
    card.root.appendChild(el("div", "chart-title", "errors, dead letters and retries per second"));
    card.errorsChart = makeChart(card.root.appendChild(el("div", "chart errors")), width,
      [series("errors", COLORS.errors), series("dead letters", COLORS.dead),
       series("retries", COLORS.retried)]);
    card.root.appendChild(el("div", "chart-title", "backlog (packets) and lag (seconds)"));
    card.backlogChart = makeChart(card.root.appendChild(el("div", "chart backlog")), width,
      [series("backlog", COLORS.backlog, {scale: "n"}),
       series("lag (s)", COLORS.lag, {scale: "s", value: function (u, v) { return fmtSeconds(v); }})],
      {x: {time: true}, n: {auto: true}, s: {auto: true}},
      [{size: 28}, {scale: "n", size: 48}, {scale: "s", side: 1, size: 48, grid: {show: false}}]);
    card.configList = card.root.appendChild(el("dl", "config"));
    card.configShown = false;
    card.samples = {rates: [[], [], [], [], []], errors: [[], [], [], []], backlog: [[], [], []]};
    return card;
  }

  function push(arrays, values) {
    values.forEach(function (value, i) {
      arrays[i].push(value);
      if (arrays[i].length > WINDOW) { arrays[i].shift(); }
    });
  }

  function showConfig(card, name, stats) {
    var item = listenerConfig(name, stats);
    if (!item || card.configShown) { return; }
    card.configShown = true;
    var keys = ["queue", "target", "pgsql", "function_name", "mode", "stomp", "batch_size",
                "batch_bytes", "prefetch", "max_retries", "dead_letter_queue"];
    keys.forEach(function (key) {
      if (item[key] === undefined || item[key] === null) { return; }
      card.configList.appendChild(el("dt", null, key === "target" ? "relation" : key));
      card.configList.appendChild(el("dd", null, item[key]));
    });
  }

  function updateCard(card, name, stats, prev, now) {
    var seconds = prev ? (now - prev.time) / 1000 : 0;
    function rate(key) {
      if (!prev || seconds <= 0) { return null; }
      var delta = stats[key] - prev.stats[key];
      return delta >= 0 ? delta / seconds : null;
    }
    var state = listenerState(stats);
    card.root.setAttribute("data-state", state);
    card.stateBadge.textContent = state === "up" ? "UP" : state === "down" ? "DOWN" : "CONNECTING";
    card.stateBadge.className = "badge state " + state;
    card.broker.textContent = "broker: " + stats.broker;
    card.broker.className = "badge " + stats.broker;
    card.database.textContent = "database: " + stats.database;
    card.database.className = "badge " + stats.database;
    card.figures.received.textContent = fmtRate(rate("received"));
    card.figures.applied.textContent = fmtRate(rate("applied"));
    card.figures.backlog.textContent = stats.backlog === null ? "-" : String(stats.backlog);
    card.figures.lag.textContent = fmtSeconds(stats.lag);
    card.figures.total.textContent = String(stats.applied);
    card.figures.errors.textContent = String(stats.errors);
    card.figures.dead.textContent = String(stats.dead_lettered);
    card.figures.retried.textContent = String(stats.retried);
    // applied without changing a row: at a target, rows it lacks (absent from an older daemon)
    card.figures.unmatched.textContent = stats.unmatched === undefined ? "-" : String(stats.unmatched);
    card.error.textContent = (stats.problems || []).map(function (problem) {
      return "problem: " + problem + "\n";
    }).join("") + (stats.last_error ?
      "last error (" + stats.last_error_at + "): " + stats.last_error : "");
    showConfig(card, name, stats);
    var t = now / 1000;
    push(card.samples.rates, [t].concat(ACTIONS.map(rate)));
    push(card.samples.errors, [t, rate("errors"), rate("dead_lettered"), rate("retried")]);
    push(card.samples.backlog, [t, stats.backlog, stats.lag]);
    card.rates.setData(card.samples.rates);
    card.errorsChart.setData(card.samples.errors);
    card.backlogChart.setData(card.samples.backlog);
    card.previous = {time: now, stats: stats};
  }

  function renderStats(data) {
    var now = Date.now();
    var seen = Object.create(null);
    var entries = [];
    data.threads.forEach(function (entry) {
      Object.keys(entry).forEach(function (name) { entries.push([name, entry[name]]); });
    });
    // destinations first, then their targets, in the server's order
    entries.sort(function (a, b) {
      return (a[1].role === "destination" ? 0 : 1) - (b[1].role === "destination" ? 0 : 1);
    });
    entries.forEach(function (pair) {
      var name = pair[0], stats = pair[1];
      seen[name] = true;
      if (!own(cards, name)) { cards[name] = makeCard(name, stats); }
      updateCard(cards[name], name, stats, cards[name].previous, now);
    });
    Object.keys(cards).forEach(function (name) {
      if (!seen[name]) {
        cards[name].root.parentNode.removeChild(cards[name].root);
        delete cards[name];
      }
    });
    Object.keys(groups).forEach(function (destination) {
      var item = groups[destination];
      if (!item.list.firstChild) { main.removeChild(item.root); delete groups[destination]; return; }
      var dconf = config && own(config.Destinations, destination) ? config.Destinations[destination] : null;
      if (dconf) {
        item.summary.textContent = dconf.mode + " mode, canonical relation " + dconf.target +
          ", " + Object.keys(dconf.Targets || {}).length + " target(s)";
      }
    });
    statusLine.className = "";
    statusLine.textContent = "version " + data.version + " | " + data.worker_threads +
      " listener threads | up " + Math.floor(data.uptime) + " s | updated " +
      new Date(now).toLocaleTimeString();
  }

  function renderHealth(status, doc) {
    var ok = status === 200;
    healthBadge.className = ok ? "ok" : "fail";
    healthBadge.textContent = ok ? "healthy" : "unhealthy";
    healthReasons.textContent = ok ? "" : (doc.reasons || []).join("; ");
  }

  function getJSON(path) {
    return fetch(path, {cache: "no-store"}).then(function (response) {
      return response.json().then(function (doc) { return {status: response.status, doc: doc}; });
    });
  }

  function poll() {
    var started = Date.now();
    Promise.all([getJSON("stats"), getJSON("health")])
      .then(function (results) {
        if (results[0].status !== 200) { throw new Error("HTTP " + results[0].status); }
        renderStats(results[0].doc);
        renderHealth(results[1].status, results[1].doc);
        page.polls += 1;
      })
      .catch(function (err) {
        page.errors += 1;
        statusLine.className = "down";
        statusLine.textContent = "cannot read /stats: " + err.message;
        healthBadge.className = "fail";
        healthBadge.textContent = "unreachable";
      })
      .then(function () { setTimeout(poll, Math.max(0, POLL_MS - (Date.now() - started))); });
  }

  getJSON("config")
    .then(function (result) {
      config = result.doc;
      document.getElementById("config").textContent = JSON.stringify(config, null, 2);
    })
    .catch(function () { document.getElementById("config").textContent = "unavailable"; })
    .then(poll);
})();
